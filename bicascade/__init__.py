"""bicascade: cost-efficient text-to-image search with bi-encoder cascades."""
__version__ = "0.1.0"
