"""moe-gen: Offline, throughput-first batch generation with module-based batching.

After the MoE-Gen paper.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
