"""agencyfl: privacy-preserving federated learning across government agencies."""

__version__ = "0.1.0"
__all__ = ["__version__"]
