"""Rows of a pinned host tensor gathered by the device reading them itself (`MappedRowGather`):
index_select on the CPU, the CuPy kernel on CUDA (marked `gpu`), against `host[slots]`."""

from __future__ import annotations

import pytest
import torch
from moe_core import MappedRowGather, mapped_rows_unsupported


def test_cpu_gather_equals_indexing_and_bad_shapes_are_refused() -> None:
    gather = MappedRowGather(torch.device("cpu"))
    host = torch.randn(50, 3, 4)
    slots = torch.tensor([7, 0, 49, 7])
    out = torch.empty(4, 3, 4)
    gather(host, slots, out)
    assert torch.equal(out, host[slots])
    with pytest.raises(ValueError, match="cannot move"):
        gather(host, slots, torch.empty(3, 3, 4))
    with pytest.raises(ValueError, match="slots int64"):
        gather(host, slots.to(torch.int32), out)
    with pytest.raises(ValueError, match="blocks"):
        MappedRowGather(torch.device("cpu"), blocks=0)
    gather.scatter(host, torch.tensor([1, 2]), torch.zeros(2, 3, 4))
    assert host[1:3].abs().sum() == 0 and host[0].abs().sum() > 0
    assert mapped_rows_unsupported(host, torch.device("cpu")) is None
    assert "device type meta" in str(mapped_rows_unsupported(host, torch.device("meta")))


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "shape", "dtype"), [
    (0, (8, 16), torch.bfloat16), (1, (8, 16), torch.bfloat16), (777, (4, 128), torch.bfloat16),
    (5000, (576,), torch.bfloat16), (3001, (3, 8), torch.float32), (4096, (16,), torch.uint8)])
def test_cuda_gather_reads_the_pinned_rows(rows: int, shape: tuple[int, ...],
                                           dtype: torch.dtype) -> None:
    """Row widths of 16 B to 1,152 B (MLA's latent), counts that are not multiples of the
    kernel's 8 loads x 256 threads, repeated slots, and no rows at all."""
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    host = torch.randint(0, 100, (6000, *shape)).to(dtype).pin_memory()
    assert mapped_rows_unsupported(host, device) is None
    assert "not pinned" in str(mapped_rows_unsupported(host.clone(), device))
    generator = torch.Generator().manual_seed(rows)
    slots = torch.randint(0, 6000, (rows,), generator=generator)
    out = torch.full((rows, *shape), 7, dtype=dtype, device=device)
    for blocks in (1, 64):
        MappedRowGather(device, blocks)(host, slots.to(device), out)
        assert torch.equal(out.cpu(), host[slots])
    # Back: distinct slots written by the device straight into the pinned rows.
    targets = torch.randperm(6000, generator=generator)[:rows]
    new = torch.randint(100, 200, (rows, *shape)).to(dtype)
    want = host.clone()
    want[targets] = new
    MappedRowGather(device).scatter(host, targets.to(device), new.to(device))
    torch.cuda.synchronize()
    assert torch.equal(host, want)
