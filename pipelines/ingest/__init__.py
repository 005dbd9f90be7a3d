"""Ingestion: corpus sources and the resumable index job (Ray Data -> LanceDB)."""
