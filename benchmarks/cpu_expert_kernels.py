"""The CPU expert kernels of two-lane decode (issue 15): GB/s of expert weights read per call.

Shapes: a Qwen3-30B-A3B expert (D 2048, I 768, bf16: 9.4 MB; FP8: 4.7 MB), 32 experts of one
layer in (pinned where CUDA is present, else plain) host memory; 4 and 8 experts per call at 1 and
4 tokens each, every kernel `cpu_kernels()` offers, over bf16 blocks and over the same experts
quantised to FP8 (`--expert-dtypes`). GB/s counts the bytes of the blocks read (an FP8 block's
are about half a bf16 one's); `weights_per_s` the expert weights multiplied, comparable across
dtypes. The issue's target is >= 60 GB/s at one token on the GPU machine's 16-core host; any
other machine's figures are only relative.

    PYTHONPATH=packages/moe-core/src python3 benchmarks/cpu_expert_kernels.py --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from moe_core.offload.cpu_experts import cpu_kernels, time_cpu_kernel
from moe_core.offload.fp8 import FP8
from moe_core.offload.layout import ExpertLayout

DTYPES = {"bf16": torch.bfloat16, "fp8": FP8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--experts-in-layer", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--expert-dtypes", default="bf16,fp8",
                        help="comma-separated: bf16, fp8 (the bf16 experts quantised)")
    parser.add_argument("--kernels", default="torch,numba", help="comma-separated")
    args = parser.parse_args()
    bf16 = ExpertLayout(hidden_size=2048, intermediate_size=768, dtype=torch.bfloat16)
    pinned = torch.cuda.is_available()
    source = torch.empty(args.experts_in_layer, bf16.numel, dtype=torch.bfloat16,
                         pin_memory=pinned).normal_(0, 0.02)
    record: dict[str, object] = {
        "script": "benchmarks/cpu_expert_kernels.py", "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "expert_bytes": {}, "runs": []}
    runs: list[dict[str, object]] = []
    for name in args.expert_dtypes.split(","):
        layout = ExpertLayout(bf16.hidden_size, bf16.intermediate_size, DTYPES[name])
        blocks = source
        if layout.is_fp8:
            blocks = torch.empty(args.experts_in_layer, layout.numel, dtype=FP8,
                                 pin_memory=pinned)
            layout.pack_layer(*bf16.stacked_views(source), blocks)
        record["expert_bytes"][name] = layout.nbytes  # type: ignore[index]
        weights = 3 * layout.hidden_size * layout.intermediate_size
        for kernel in (k for k in cpu_kernels() if k.name in args.kernels.split(",")):
            for experts in (4, 8):
                for tokens in (1, 4):
                    timing = time_cpu_kernel(kernel, blocks, layout, experts, tokens,
                                             args.repeats)
                    runs.append({"expert_dtype": name, "kernel": kernel.name,
                                 "experts": experts, "tokens": tokens,
                                 "ms": timing.seconds * 1e3, "gb_per_s": timing.gb_per_s,
                                 "weights_per_s": experts * weights / timing.seconds})
                    print(f"{name:4s} {kernel.name:6s} experts {experts} tokens {tokens}: "
                          f"{timing.seconds * 1e3:7.2f} ms  {timing.gb_per_s:6.1f} GB/s  "
                          f"{experts * weights / timing.seconds / 1e9:6.1f} G weights/s",
                          flush=True)
    record["runs"] = runs
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
