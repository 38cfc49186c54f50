"""moe-infinity: Latency-first serving with activation-aware expert offloading.

After the MoE-Infinity paper.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
