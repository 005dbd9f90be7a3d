"""Ray actors: per-level encoders and the cascade router."""
