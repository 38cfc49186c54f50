"""The offload runtime: experts in host memory, GPU slots, a copy engine, and the executors that
plug into each MoE block's `ExpertExecutor` seam (issue #4).

Dimension key: E experts per layer, D hidden, I expert width, S slots.
"""
