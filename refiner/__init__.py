"""Refiner attention: reference models and fused kernels."""
__version__ = "0.1.0"
