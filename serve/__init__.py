"""Ray Serve app and HTTP API."""
