"""`kernels.decode_attention` against the SDPA reference: strided cache views, masked keys
(including whole masked splits and -inf), several splits and one, B > 1, MQA and MHA, head dims
that are not powers of two. Compiled on CUDA where present, else under Triton's CPU interpreter.

Dimension key: B batch, H query heads, G key/value heads, R = H/G, S keys, E head channels.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from moe_core.kernels import attention as attention_module
from moe_core.kernels import (
    decode_attention,
    decode_attention_reference,
    decode_attention_supported,
)
from moe_core.kernels.attention import attention_launch

NEG = torch.finfo(torch.float32).min


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest); a fallback to a torch reference fails the test."""
    return kernel_device(attention_module, ("decode_attention_reference",))


@pytest.fixture
def many_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch as for an H200, so that short test caches still split across programs."""
    monkeypatch.setattr(attention_module, "num_sms", lambda device: 132)


def cache_views(b: int, s: int, g: int, e: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(k, v)` `[B, S, G, E]` strided views into one padded `[B, S+3, 2G, E+8]` buffer: batch,
    key and head strides all differ from a contiguous tensor's."""
    buffer = torch.randn(b, s + 3, 2 * g, e + 8).to(device, dtype)
    return buffer[:, 2 : s + 2, :g, :e], buffer[:, 1 : s + 1, g:, 8:]


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """The reference in float64 on the CPU on the same (rounded) values."""
    return decode_attention_reference(*(x.cpu().double() for x in (q, k, v, mask)), scale)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Largest error within `rtol` of the largest magnitude. Not `torch.testing.assert_close`:
    its first call imports DTensor (seconds)."""
    assert actual.shape == expected.shape
    err = (actual.cpu().double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.usefixtures("many_sms")
@pytest.mark.parametrize(("b", "h", "g", "s", "e"), [(2, 8, 2, 100, 64), (1, 8, 1, 70, 32)])
def test_float32_split_keys_with_masks_match_the_reference(device: torch.device, b: int, h: int,
                                                           g: int, s: int, e: int) -> None:
    torch.manual_seed(b * 10 + g)
    k, v = cache_views(b, s, g, e, torch.float32, device)
    q = torch.randn(b, h, e, device=device)
    mask = torch.zeros(b, s, device=device)
    mask[:, ::3] = NEG  # scattered masked keys
    mask[0, :64] = NEG  # the whole first split (64 keys) masked in row 0
    assert attention_launch(b, g, h // g, s, e, 132).num_splits > 1
    assert decode_attention_supported(q, k)
    out = decode_attention(q, k, v, mask, e**-0.5)
    assert out.shape == (b, h, e) and out.dtype == torch.float32
    assert_near(out, oracle(q, k, v, mask, e**-0.5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_an_odd_head_dim(device: torch.device, many_sms: None,
                                             dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    b, h, g, s, e = 2, 4, 4, 150, 80  # MHA (R = 1), E padded to 128, three splits
    k, v = cache_views(b, s, g, e, dtype, device)
    q = torch.randn(b, h, e).to(device, dtype)
    mask = torch.zeros(b, s, device=device)
    mask[1, 100:] = NEG  # right padding: the last split wholly masked
    assert attention_launch(b, g, h // g, s, e, 132).num_splits == 3
    out = decode_attention(q, k, v, mask, 0.1)
    assert out.dtype == dtype
    assert_near(out, oracle(q, k, v, mask, 0.1), rtol=1e-2)


def test_one_split_writes_the_output_directly(device: torch.device) -> None:
    torch.manual_seed(4)
    b, h, g, s, e = 1, 16, 2, 20, 64
    assert attention_launch(b, g, h // g, s, e, 132).num_splits == 1
    k, v = cache_views(b, s, g, e, torch.float32, device)
    q = torch.randn(b, h, e, device=device)
    mask = torch.zeros(b, s, device=device)
    mask[0, 5] = NEG
    assert_near(decode_attention(q, k, v, mask, 0.125), oracle(q, k, v, mask, 0.125), rtol=1e-5)


@pytest.mark.usefixtures("many_sms")
def test_minus_infinity_masks_and_a_strided_query(device: torch.device) -> None:
    torch.manual_seed(5)
    b, h, g, s, e = 2, 4, 1, 96, 32  # MQA: four heads on one key/value head
    k, v = cache_views(b, s, g, e, torch.float32, device)
    q = torch.randn(b, h, 2 * e, device=device)[:, :, :e]  # head stride 2E
    mask = torch.zeros(b, s, device=device)
    mask[0, :64] = float("-inf")  # a whole split of -inf
    mask[1, 1::2] = float("-inf")
    assert_near(decode_attention(q, k, v, mask, 0.2), oracle(q, k, v, mask, 0.2), rtol=1e-5)


def test_unsupported_shapes_fall_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a request for Triton; the checks refuse it
    torch.manual_seed(6)
    q = torch.randn(1, 4, 300)
    k, v = cache_views(1, 8, 2, 300, torch.float32, torch.device("cpu"))
    mask = torch.zeros(1, 8)
    assert not decode_attention_supported(q, k)  # E > 256
    expected = decode_attention_reference(q, k, v, mask, 0.1)
    assert torch.equal(decode_attention(q, k, v, mask, 0.1), expected)
    assert not decode_attention_supported(q[:, :3], k)  # H not a multiple of G
    assert not decode_attention_supported(q.double(), k.double())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not decode_attention_supported(q[..., :64], k[..., :64])  # CPU, no interpreter


@pytest.mark.parametrize("batch", [1, 4, 16, 64])
@pytest.mark.parametrize("keys", [512, 1024, 4096])
def test_launch_fills_an_h200_and_covers_every_key_once(batch: int, keys: int) -> None:
    cfg = attention_launch(batch, 4, 8, keys, 128, sms=132)  # Qwen3-30B-A3B: H=32, G=4
    programs = batch * 4 * cfg.num_splits
    # About a program per SM where the keys allow (rounding to whole key steps may halve it).
    assert 2 * programs >= min(132, batch * 4 * -(-keys // cfg.block_s))
    assert cfg.split_len % cfg.block_s == 0
    assert (cfg.num_splits - 1) * cfg.split_len < keys <= cfg.num_splits * cfg.split_len
    assert cfg.block_r == 16 and cfg.block_e == 128 and cfg.block_s == 64


@pytest.mark.usefixtures("many_sms")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_paged_pool_is_read_through_each_rows_slots(device: torch.device,
                                                      dtype: torch.dtype) -> None:
    """Keys and values in one shared pool `[1, N, G, E]`, each row's keys named by its slots
    `[B, S]` (scattered, some shared between rows, padding reading slot 0 under the mask):
    the result is the reference on each row's gathered keys, and nothing is gathered."""
    torch.manual_seed(6)
    b, h, g, s, e, n = 3, 8, 2, 90, 32, 300
    k_pool, v_pool = cache_views(1, n, g, e, dtype, device)
    index = torch.stack([torch.randperm(n)[:s] for _ in range(b)]).to(device)  # [B, S]
    index[2, 60:] = 0  # padding keys
    mask = torch.zeros(b, s, device=device)
    mask[2, 60:] = NEG
    mask[:, ::7] = NEG
    q = torch.randn(b, h, e).to(device, dtype)
    out = decode_attention(q, k_pool, v_pool, mask, e**-0.5, index)
    k, v = k_pool[0][index], v_pool[0][index]  # [B, S, G, E] what each row attends
    assert out.shape == (b, h, e) and out.dtype == dtype
    assert_near(out, oracle(q, k, v, mask, e**-0.5), rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_an_index_needs_one_shared_pool() -> None:
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 10, 2, 16)
    with pytest.raises(ValueError, match="shared pool"):
        decode_attention(q, k, k, torch.zeros(2, 5), 0.25, torch.zeros(2, 5, dtype=torch.long))
