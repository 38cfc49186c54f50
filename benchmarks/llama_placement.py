"""Where llama.cpp keeps a GGUF's weights when it is run with `-ngl 99 --n-cpu-moe N`, and the
N that fits a GPU weight budget.

With every layer offloaded (`-ngl 99`), llama.cpp puts every tensor on the GPU but two kinds:
the token embedding (the input layer: "there is very little benefit to offloading the input
layer, so always keep it on the CPU", src/llama-model.cpp) and, with `--n-cpu-moe N`, the routed
experts of layers 0 .. N-1 (tensors matching common.h's `LLM_FFN_EXPS_REGEX`,
`\\.ffn_(up|down|gate|gate_up)_(ch|)exps`), which stay in host memory and run on the CPU. The
bytes counted are those of the file's tensors as stored (bf16, or Q8_0's 34 bytes per 32
values), so an 8-bit file fits about twice the layers of experts in the same budget. The KV
cache and the compute buffers come on top, as in the S3 runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dummy_gguf import TensorPlan

_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch|)exps\.")
_HOST_ALWAYS = ("token_embd.weight",)


def expert_layer(name: str) -> int | None:
    """The layer of a routed-expert tensor (`blk.3.ffn_up_exps.weight` -> 3); None otherwise."""
    match = _EXPERTS.match(name)
    return int(match.group(1)) if match else None


def gpu_weight_bytes(plan: Sequence[TensorPlan], n_cpu_moe: int) -> int:
    """Bytes of the tensors llama.cpp holds on the GPU under `-ngl 99 --n-cpu-moe n_cpu_moe`."""
    total = 0
    for t in plan:
        layer = expert_layer(t.name)
        if t.name in _HOST_ALWAYS or (layer is not None and layer < n_cpu_moe):
            continue
        total += t.nbytes
    return total


def n_cpu_moe_for(plan: Sequence[TensorPlan], num_layers: int, budget_bytes: int) -> int:
    """The fewest layers whose experts stay on the CPU so that the GPU's weights fit
    `budget_bytes` (0: the whole model fits).

    Raises:
        ValueError: not even with every layer's experts on the CPU.
    """
    for n in range(num_layers + 1):
        if gpu_weight_bytes(plan, n) <= budget_bytes:
            return n
    need = gpu_weight_bytes(plan, num_layers)
    raise ValueError(f"--gpu-weights {budget_bytes / 2**30:.2f} GiB is below the "
                     f"{need / 2**30:.2f} GiB the GPU needs with every layer's experts on the CPU")
