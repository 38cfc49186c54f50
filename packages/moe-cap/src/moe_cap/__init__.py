"""moe-cap: Cost, accuracy and performance benchmarking of MoE systems (after the MoE-CAP paper)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
