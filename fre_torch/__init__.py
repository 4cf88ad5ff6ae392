"""fre_torch: anomaly detection by Feature Reconstruction Error, in PyTorch."""

__version__ = "0.1.0"
