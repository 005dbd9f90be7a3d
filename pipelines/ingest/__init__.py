"""Ingestion: corpus sources, the resumable index job (Ray Data -> LanceDB), migrations to a new ladder, and the
Ray cluster every job and `bicascade serve` run on (`cluster.py`: a loopback-only local one, or RAY_ADDRESS's)."""
