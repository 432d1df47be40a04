"""Pollinate: federated learning with per-user personalized and global models, on Flower."""

__version__ = "0.1.0"
