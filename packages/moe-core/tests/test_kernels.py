"""The kernels' torch references restate the existing moe-core computations exactly (they are the
oracles of `test_kernels_*.py` and the fallbacks off the GPU), importing or calling the kernels
package off the GPU never imports Triton, and the kernel suites run under Triton's interpreter
even in a session where something else imported Triton first.

Dimension key: T tokens, K experts per token, D hidden, I expert width, W stacked weights,
B batch, H query heads, G key/value heads, S keys, E head channels / routed experts.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from moe_core import RouterSpec, kernels, route
from moe_core.gathered_experts import gathered_experts
from moe_core.kernels import (
    add_rms_norm_reference,
    backend,
    decode_attention_reference,
    moe_experts_reference,
    rms_norm_reference,
    softmax_topk_reference,
)
from moe_core.kernels.backend import prepare_interpreter
from moe_core.layers.attention import attend
from moe_core.layers.norm import RMSNorm

INTERPRETER_SUITES = ("test_kernels_experts.py", "test_kernels_attention.py",
                      "test_kernels_norm_routing.py", "test_kernels_rotary.py",
                      "test_kernels_qkv_rope.py")


def test_moe_experts_reference_is_gathered_experts_and_the_definition() -> None:
    torch.manual_seed(0)
    t, k, d, i, w = 3, 2, 12, 8, 5
    gate, up, down = torch.randn(w, i, d), torch.randn(w, i, d), torch.randn(w, d, i)
    hidden, index, weights = torch.randn(t, d), torch.randint(0, w, (t, k)), torch.rand(t, k)
    out = moe_experts_reference(hidden, index, weights, gate, up, down)
    assert torch.equal(out, gathered_experts(hidden, index, weights, gate, up, down))
    by_hand = torch.zeros(t, d, dtype=torch.float64)
    for tok in range(t):
        x = hidden[tok].double()
        for slot in range(k):
            j = index[tok, slot]
            h = F.silu(gate[j].double() @ x) * (up[j].double() @ x)  # [I]
            by_hand[tok] += weights[tok, slot].double() * (down[j].double() @ h)
    assert (out.double() - by_hand).abs().max() <= 1e-5 * by_hand.abs().max()


def test_decode_attention_reference_is_attend_on_one_query() -> None:
    torch.manual_seed(1)
    b, h, g, s, e = 2, 6, 3, 9, 16
    q, k, v = torch.randn(b, h, e), torch.randn(b, s, g, e), torch.randn(b, s, g, e)
    mask = torch.zeros(b, s)
    mask[0, 4:] = torch.finfo(torch.float32).min
    out = decode_attention_reference(q, k, v, mask, 0.25)
    expected = attend(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                      mask[:, None, None, :], 0.25)[:, :, 0]  # [B, H, E]
    assert torch.equal(out, expected)
    scores = torch.einsum("bhe,bshe->bhs", q, k.repeat_interleave(h // g, dim=2)) * 0.25
    probs = torch.softmax(scores + mask[:, None, :], dim=-1)  # [B, H, S]
    by_hand = torch.einsum("bhs,bshe->bhe", probs, v.repeat_interleave(h // g, dim=2))
    assert (out - by_hand).abs().max() <= 1e-5


def test_rms_norm_reference_is_the_rmsnorm_module_bit_for_bit() -> None:
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        norm = RMSNorm(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(48))
        x, delta = torch.randn(4, 48).to(dtype), torch.randn(4, 48).to(dtype)
        assert torch.equal(rms_norm_reference(x, norm.weight.detach(), 1e-6), norm(x).detach())
        summed, normed = add_rms_norm_reference(x, delta, norm.weight.detach(), 1e-6)
        assert torch.equal(summed, x + delta)
        assert torch.equal(normed, norm(x + delta).detach())


def test_softmax_topk_reference_is_route() -> None:
    torch.manual_seed(3)
    logits = torch.randn(7, 64, dtype=torch.bfloat16)
    for normalize, scaling in ((True, 1.0), (False, 2.5)):
        spec = RouterSpec(method="softmax_topk", top_k=6, normalize=normalize,
                          scaling_factor=scaling)
        ids, weights = softmax_topk_reference(logits, 6, normalize, scaling)
        expected_ids, expected_weights = route(logits, spec)
        assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)


def test_only_the_lazily_imported_modules_import_triton() -> None:
    """Every `import triton` of the package sits in a `*_triton` module or inside a function,
    and nothing imports a `*_triton` module at module level: importing moe_core stays free of
    Triton (a subprocess check would cost seconds of moe_core import)."""
    folder = Path(kernels.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if path.stem.endswith("_triton"):
                    continue
                assert not name.startswith("triton"), f"{path.name} imports {name}"
                assert not name.endswith("_triton"), f"{path.name} imports {name}"


def test_calls_off_the_gpu_never_look_for_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def refuse() -> bool:
        raise AssertionError("looked for Triton")

    monkeypatch.setattr(backend, "triton_importable", refuse)
    x = torch.randn(2, 16)
    kernels.rms_norm(x, torch.ones(16), 1e-6)
    kernels.add_rms_norm(x, x, torch.ones(16), 1e-6)
    kernels.softmax_topk(torch.randn(2, 8), 2, True, 1.0)
    kernels.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 3, 1, 8),
                             torch.randn(1, 3, 1, 8), torch.zeros(1, 3), 0.5)
    kernels.moe_experts(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                        torch.randn(1, 4, 16), torch.randn(1, 4, 16), torch.randn(1, 16, 4))


def test_kernel_suites_run_in_a_fresh_interpreter_process_when_triton_came_first() -> None:
    """Triton picks interpreting or compiling for its own standard library when it is imported.
    In a whole-suite run something else imports it first (transformers does), and the kernel
    suites then skip in-process; here they run in a fresh process with `TRITON_INTERPRET=1` set
    from the start. Skipped where they run in-process: on a GPU, or with Triton interpreted."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel suites run compiled, in-process")
    if importlib.util.find_spec("triton") is None:  # not importing it: that would compile
        pytest.skip("Triton is not installed")
    if prepare_interpreter():
        pytest.skip("Triton is interpreted in this process: the kernel suites run in-process")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               *(str(here / suite) for suite in INTERPRETER_SUITES)]
    result = subprocess.run(command, cwd=here.parents[2], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "passed" in result.stdout and "imported without its interpreter" not in report, report
