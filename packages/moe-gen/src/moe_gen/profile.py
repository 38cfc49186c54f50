"""A short on-device profile: the rates the cost model needs, measured where the job runs.

On a GPU it takes about a second; on the CPU the sizes shrink so it stays well under that. Each
figure is the best of a few repetitions after a warm-up (the planner wants capability, not noise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from moe_core import MappedRowGather, ModelSpec, attend, mapped_rows_unsupported

from moe_gen.paged_attention import NumbaPagedAttention, time_paged_attention

__all__ = ["DeviceProfile", "host_attention_rates", "profile_device"]


@dataclass(frozen=True)
class DeviceProfile:
    """Measured rates of one machine.

    Attributes:
        device: `"cuda"` or `"cpu"`, with the GPU's name where there is one.
        h2d_bytes_per_s: Pinned host-to-device copy rate (PCIe; a memcpy on the CPU).
        gather_bytes_per_s: Host rate of gathering KV pages into a staging buffer (from a
            source larger than the host's caches, as the KV arenas are).
        matmul_flops_per_s: Matrix-product rate at expert-like shapes.
        attention_keys_per_s: Decode attention: (query token, key, layer) triples per second on
            the device, at the model's head shape.
        cpu_attention_keys_per_s: The same on the host, with the faster of the host attention
            kernels (`cpu_attention_kernel`), measured the way the engine runs it.
        cpu_matmul_flops_per_s: Host matrix-product rate (the host's attention projections).
        launch_s: Fixed cost of one small device operation (launch and dispatch latency); a
            micro-batch pays some tens of them per layer.
        cpu_attention_kernel: The host attention kernel measured fastest (`"torch"` or
            `"numba"`; see `host_attention.py`).
        mapped_gather_bytes_per_s: Rate of the device gathering KV rows from pinned host
            memory itself (`moe_core.MappedRowGather`, the `"mapped"` KV gather); 0 where it
            cannot (the CPU, no CuPy).
    """

    device: str
    h2d_bytes_per_s: float
    gather_bytes_per_s: float
    matmul_flops_per_s: float
    attention_keys_per_s: float
    cpu_attention_keys_per_s: float
    cpu_matmul_flops_per_s: float
    launch_s: float
    cpu_attention_kernel: str = "torch"
    mapped_gather_bytes_per_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)


def _best(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _attention_rate(spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch: int,
                    keys: int) -> float:
    """Decode attention keys per second the way the engine attends: the cached keys joined with
    the new one (the micro-batch's cache returns them joined), then GQA through moe-core's own
    `attend`, which the attention modules call: on CUDA its GQA decode kernel reads each group
    once (decision 0007), elsewhere the groups are expanded to every query head for SDPA with an
    additive mask. (Plain attention over ready-made heads overstated the host's rate 6x on a
    2-core runner and ~4x on the H200 host; re-implementing `attend` here went stale when
    decision 0007 gave CUDA decode its kernel: the profile measured 3.4e7 keys/s on the H200 for
    Mixtral shapes, where the kernel alone attends ~1.9e9.) MLA attends its re-expanded heads
    with SDPA here; the latent's re-expansion is a matrix product, counted apart in the cost
    model."""
    att = spec.attention
    heads = att.num_heads
    kv_heads = heads if att.kind == "mla" else att.num_kv_heads
    dim = att.head_dim  # MLA attends its re-expanded heads, of this width too
    q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    past = torch.randn(batch, keys - 1, kv_heads, dim, device=device, dtype=dtype)
    new = torch.randn(batch, 1, kv_heads, dim, device=device, dtype=dtype)
    mask = torch.zeros(batch, 1, 1, keys, device=device, dtype=dtype)

    def attend_once() -> torch.Tensor:
        k = torch.cat((past, new), dim=1).transpose(1, 2)  # [b, G, S, E]
        v = torch.cat((past, new), dim=1).transpose(1, 2)
        if att.kind == "mla":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attend(q, k, v, mask, dim**-0.5)  # [b, H, 1, E]

    seconds = _best(attend_once, device)
    return batch * keys / seconds


def host_attention_rates(spec: ModelSpec, dtype: torch.dtype, batch: int = 16,
                         keys: int = 512) -> dict[str, float]:
    """Decode attention keys per second on the host, per host attention kernel, each measured
    the way the engine runs it: torch's path as `_attention_rate` does; the paged kernel over
    `batch` sequences of `keys` keys in shuffled 16-token pages of arenas in `dtype`, the new key
    apart (MLA: the latent and rotary key as its two key parts, the latent as the values)."""
    rates = {"torch": _attention_rate(spec, torch.device("cpu"), dtype, batch, keys)}
    att = spec.attention
    if att.kind == "mla":
        assert att.kv_lora_rank is not None and att.qk_rope_head_dim is not None
        parts, value, groups = [att.kv_lora_rank, att.qk_rope_head_dim], 0, 1
    else:
        parts, value, groups = [att.head_dim], 1, att.num_kv_heads
    try:
        seconds, _ = time_paged_attention(NumbaPagedAttention(), att.num_heads, parts, value,
                                          groups, dtype, batch, keys)
    except ImportError:  # numba missing: torch's path only
        return rates
    rates["numba"] = batch * keys / seconds
    return rates


def profile_device(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype
                   ) -> DeviceProfile:
    """Measure the rates the cost model needs for `spec` on `device`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    mib = 64 if cuda else 16
    host = torch.ones(mib << 20, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty_like(host, device=device)
    h2d = host.numel() / _best(lambda: target.copy_(host, non_blocking=True), device)
    row_bytes = _kv_row_bytes(spec, dtype)
    # The arenas are far larger than the host's caches: gather from a source that is too.
    source = torch.ones((512 if cuda else 32) << 20, dtype=torch.uint8).view(-1, row_bytes)
    index = torch.randperm(source.shape[0])[: (mib << 20) // row_bytes]
    out = torch.empty(index.numel(), row_bytes, dtype=torch.uint8)
    gather = out.numel() / _best(lambda: torch.index_select(source, 0, index, out=out),
                                 torch.device("cpu"))
    mapped = _mapped_gather_rate(device, row_bytes) if cuda else 0.0
    n = 2048 if cuda else 256
    width = min(spec.hidden_size, 4096) if cuda else 256
    a = torch.randn(n, width, device=device, dtype=dtype)
    b = torch.randn(width, width, device=device, dtype=dtype)
    flops = 2 * n * width * width / _best(lambda: a @ b, device)
    batch, keys = (64, 1024) if cuda else (4, 128)
    attention = _attention_rate(spec, device, dtype, batch, keys)
    cpu = torch.device("cpu")
    # The host attends only on GPU runs (on a CPU run the host is the device: share 0).
    host_rates = host_attention_rates(spec, dtype) if cuda else {"torch": attention}
    host_kernel = max(host_rates, key=lambda name: host_rates[name])
    cpu_attention = host_rates[host_kernel]
    if cuda:
        x = torch.randn(64, 1024, dtype=dtype)
        w = torch.randn(1024, 1024, dtype=dtype)
        cpu_flops = 2 * 64 * 1024 * 1024 / _best(lambda: x @ w, cpu)
    else:
        cpu_flops = flops
    tiny = torch.ones(8, device=device, dtype=dtype)
    launch = _best(lambda: [tiny.add_(0) for _ in range(20)], device) / 20
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DeviceProfile(name, h2d, gather, flops, attention, cpu_attention, cpu_flops, launch,
                         host_kernel, mapped)


def _kv_row_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of one token's first cached tensor in one layer (a gathered KV row), rounded up
    to 16 (the mapped gather's word)."""
    elements = math.prod(spec.attention.kv_token_shapes()[0])
    return -(-elements * torch.empty(0, dtype=dtype).element_size() // 16) * 16


def _mapped_gather_rate(device: torch.device, row_bytes: int) -> float:
    """Bytes per second of `MappedRowGather` reading random rows of a pinned 256 MiB arena into
    the device (0.0 where the device cannot read host memory)."""
    arena = torch.ones(256 << 20, dtype=torch.uint8, pin_memory=True).view(-1, row_bytes)
    if mapped_rows_unsupported(arena, device) is not None:
        return 0.0
    slots = torch.randperm(arena.shape[0])[: arena.shape[0] // 2].to(device)
    out = torch.empty(slots.numel(), row_bytes, dtype=torch.uint8, device=device)
    gather = MappedRowGather(device)
    return out.numel() / _best(lambda: gather(arena, slots, out), device)
