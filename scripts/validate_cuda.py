"""Validate moe-core on a CUDA GPU: for every architecture, our logits in bf16/fp16/fp32 on the
GPU against our fp32 CPU logits, with transformers' own bf16-on-GPU error beside them for scale,
and greedy generation on the GPU against transformers' greedy generation.

Low-precision error has two parts: rounding, and routing flips (a token whose top-k set changes
because two router scores were within rounding of each other, which moves its output by a whole
expert). Random weights have small router margins, so flips are common; the "pinned" figure runs
bf16 with the fp32 reference's routing decisions to show the rounding part alone, and
`bf16_flip_share` counts how many (token, layer) expert sets changed.

Run on the GPU machine (no uv there):
    PYTHONPATH=packages/moe-core/src python3 scripts/validate_cuda.py --out results.json
Prints a table last; writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from moe_core import load_model
from moe_core.generation import left_pad, pad_token_for
from moe_core.tiny_checkpoints import TINY_KINDS, build_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

# "small" is wide enough that bf16 rounding behaves as in real models (D=512, 16 experts).
SIZES = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 4,
              "vocab_size": 1024},
}
SMALL_KIND_OVERRIDES = {
    "mixtral": {"intermediate_size": 1024, "num_local_experts": 16, "num_key_value_heads": 4},
    "qwen2_moe": {"moe_intermediate_size": 256, "shared_expert_intermediate_size": 512,
                  "intermediate_size": 1024, "num_experts": 16, "num_key_value_heads": 4},
    "qwen3_moe": {"moe_intermediate_size": 256, "intermediate_size": 1024, "num_experts": 16,
                  "head_dim": 64, "num_key_value_heads": 4},
    "olmoe": {"intermediate_size": 256, "num_experts": 16, "num_key_value_heads": 8},
    "deepseek_v2": {"moe_intermediate_size": 256, "intermediate_size": 1024,
                    "n_routed_experts": 16, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                    "qk_rope_head_dim": 32, "v_head_dim": 64, "num_key_value_heads": 8},
    "deepseek_v3": {"moe_intermediate_size": 256, "intermediate_size": 1024,
                    "n_routed_experts": 16, "kv_lora_rank": 128, "q_lora_rank": 192,
                    "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
                    "num_key_value_heads": 8},
}


def record_routing(model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Keep each MoE layer's routing decisions of the next pass."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for block in model.moe_blocks():
        block.observer = lambda layer, ids, w: store.__setitem__(layer, (ids.cpu(), w.cpu()))
    return store


def pin_routing(model: torch.nn.Module,
                store: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make every router return the recorded decisions instead of its own."""
    for block in model.moe_blocks():
        ids, w = store[block.layer]
        block.gate.forward = lambda h, ids=ids, w=w: (ids.to(h.device), w.to(h.device))


def flip_share(a: dict[int, tuple[torch.Tensor, torch.Tensor]],
               b: dict[int, tuple[torch.Tensor, torch.Tensor]], real: torch.Tensor) -> float:
    """Share of (real token, layer) whose chosen expert set differs (padding is not counted)."""
    changed = total = 0
    keep = real.reshape(-1).cpu()
    for layer, (ids_a, _) in a.items():
        ids_b = b[layer][0]
        differs = (ids_a.sort(-1).values != ids_b.sort(-1).values).any(-1)
        changed += int(differs[keep].sum())
        total += int(keep.sum())
    return changed / total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def check(kind: str, size: str, folder: Path) -> dict[str, object]:
    overrides = dict(SIZES[size])
    if size != "tiny":
        overrides.update(SMALL_KIND_OVERRIDES[kind])
    std = 0.15 if size == "tiny" else 0.02
    build_tiny_checkpoint(kind, folder, seed=1, std=std, **overrides)
    vocab = tiny_config(kind, **overrides).vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (48, 40, 33, 25)]
    return {"kind": kind, "size": size, **compare_dtypes(folder, rows)}


@torch.no_grad()
def compare_dtypes(folder: Path, rows: list[list[int]]) -> dict[str, object]:
    """bf16/fp16/fp32 on the GPU and transformers' bf16 against our fp32 CPU logits, and fp32
    greedy generation against transformers', for prompts `rows`."""
    reference = load_model(folder, device="cpu", dtype="float32")
    ids, mask = left_pad(rows, 0)
    real = mask.bool()
    ref_routing = record_routing(reference)
    ref_logits = reference(ids, attention_mask=mask)[real]
    record: dict[str, object] = {"params": reference.spec.total_params}
    for dtype in ("bfloat16", "float16", "float32"):
        model = load_model(folder, device="cuda", dtype=dtype)
        routing = record_routing(model)
        logits = model(ids.cuda(), attention_mask=mask.cuda())[real.cuda()]
        record[f"ours_{dtype}_rel_err"] = rel(logits, ref_logits)
        record[f"ours_{dtype}_finite"] = bool(torch.isfinite(logits).all())
        record[f"{dtype}_flip_share"] = flip_share(ref_routing, routing, real)
        if dtype == "bfloat16":
            pin_routing(model, ref_routing)
            pinned = model(ids.cuda(), attention_mask=mask.cuda())[real.cuda()]
            record["ours_bfloat16_pinned_rel_err"] = rel(pinned, ref_logits)
        del model
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    hf_logits = hf(input_ids=ids.cuda(), attention_mask=mask.cuda(),
                   position_ids=positions.cuda()).logits[real.cuda()]
    record["transformers_bfloat16_rel_err"] = rel(hf_logits, ref_logits)
    # Greedy tokens in fp32 on the GPU: ours vs transformers on the same device and dtype.
    ours32 = load_model(folder, device="cuda", dtype="float32")
    hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    t0 = time.perf_counter()
    tokens = ours32.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32)
    torch.cuda.synchronize()
    record["ours_generate_s"] = time.perf_counter() - t0
    hf_tokens = hf32.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32,
                              do_sample=False, pad_token_id=pad_token_for(ours32))
    hf_tokens = hf_tokens[:, ids.shape[1]:]
    record["greedy_fp32_cuda_match"] = (tokens.shape == hf_tokens.shape
                                        and bool(torch.equal(tokens, hf_tokens)))
    return record


def to_device(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` on `device` in `dtype`, routers kept in float32 where the family does."""
    moved = copy.deepcopy(model).to(device=device, dtype=dtype)
    if moved.spec.moe.router.fp32_gate:
        for block in moved.moe_blocks():
            block.gate.float()
    return moved


@torch.no_grad()
def check_shape(name: str, num_layers: int) -> dict[str, object]:
    """A real model's shapes (dummy weights, first `num_layers` layers): bf16 on the GPU against
    fp32 on the CPU, same weights."""
    reference = load_model(name, device="cpu", dtype="float32", dummy=True, num_layers=num_layers)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, reference.spec.vocab_size, (n,), generator=gen).tolist()
            for n in (64, 37)]
    ids, mask = left_pad(rows, 0)
    real = mask.bool()
    ref_routing = record_routing(reference)
    ref_logits = reference(ids, attention_mask=mask)[real]
    model = to_device(reference, "cuda", torch.bfloat16)
    routing = record_routing(model)
    logits = model(ids.cuda(), attention_mask=mask.cuda())[real.cuda()]
    record: dict[str, object] = {"shape": name, "num_layers": num_layers,
                                 "ours_bfloat16_rel_err": rel(logits, ref_logits),
                                 "bfloat16_flip_share": flip_share(ref_routing, routing, real)}
    pin_routing(model, ref_routing)
    pinned = model(ids.cuda(), attention_mask=mask.cuda())[real.cuda()]
    record["ours_bfloat16_pinned_rel_err"] = rel(pinned, ref_logits)
    return record


@torch.no_grad()
def resident_decode(name: str, prompt_tokens: int = 512, new_tokens: int = 64) -> dict[str, object]:
    """The whole model resident on the GPU (bf16 dummy weights), batch 1: TTFT and time per token
    through `generate` with the plain local expert executor (a baseline, not tuned)."""
    model = load_model(name, device="cuda", dtype="bfloat16", dummy=True)
    ids = torch.randint(3, model.spec.vocab_size, (1, prompt_tokens), device="cuda")
    model.generate(ids[:, :32], max_new_tokens=4)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    assert out.shape[1] == new_tokens
    return {"shape": name, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "ttft_s": ttft, "time_per_output_token_s": (total - ttft) / (new_tokens - 1),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def trained_rows(data_dir: Path, per_domain: int = 2, length: int = 64) -> list[list[int]]:
    """Held-out text windows of every domain of a tiny-model data folder (real routing)."""
    import numpy as np

    manifest = json.loads((data_dir / "manifest.json").read_text())
    rows = []
    for domain in manifest["domains"]:
        tokens = np.load(data_dir / f"{domain}.heldout.npy")
        rows += [tokens[i * length : (i + 1) * length - 7 * i].tolist() for i in range(per_domain)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default=None, help="Git commit of the code being run.")
    parser.add_argument("--trained", type=Path, nargs=2, metavar=("MODEL", "DATA"),
                        help="Only check a trained checkpoint on held-out text of its data folder.")
    parser.add_argument("--shapes", action="store_true",
                        help="Also check real model shapes (dummy weights) "
                             "and time resident decode.")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True,
                                           check=False).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if args.trained:
        record = compare_dtypes(args.trained[0], trained_rows(args.trained[1]))
        args.out.write_text(json.dumps({"meta": meta, "trained": record}, indent=2))
        print(json.dumps(record))
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            for kind in TINY_KINDS:
                records.append(check(kind, size, Path(tmp) / f"{kind}-{size}"))
    shape_records: list[dict[str, object]] = []
    decode_records: list[dict[str, object]] = []
    if args.shapes:
        for name, layers in (("mixtral-8x7b", 2), ("qwen3-30b-a3b", 4), ("deepseek-v2-lite", 4),
                             ("qwen1.5-moe-a2.7b", 4), ("olmoe-1b-7b", 4)):
            shape_records.append(check_shape(name, layers))
            torch.cuda.empty_cache()
        decode_records.append(resident_decode("qwen3-30b-a3b"))
    args.out.write_text(json.dumps({"meta": meta, "results": records, "shapes": shape_records,
                                    "resident_decode": decode_records}, indent=2))
    print(json.dumps(meta))
    print(f"{'kind':<12} {'size':<6} {'bf16':>9} {'pinned':>9} {'flips':>6} {'fp16':>9} "
          f"{'fp32':>9} {'hf bf16':>9} greedy")
    for r in records:
        print(f"{r['kind']:<12} {r['size']:<6} {r['ours_bfloat16_rel_err']:9.2e} "
              f"{r['ours_bfloat16_pinned_rel_err']:9.2e} {r['bfloat16_flip_share']:6.1%} "
              f"{r['ours_float16_rel_err']:9.2e} {r['ours_float32_rel_err']:9.2e} "
              f"{r['transformers_bfloat16_rel_err']:9.2e} {r['greedy_fp32_cuda_match']}")
    for r in shape_records:
        print(f"{r['shape']:<18} x{r['num_layers']} layers: "
              f"bf16 {r['ours_bfloat16_rel_err']:.2e}, "
              f"pinned {r['ours_bfloat16_pinned_rel_err']:.2e}, "
              f"flips {r['bfloat16_flip_share']:.1%}")
    for r in decode_records:
        print(f"{r['shape']} resident bf16 batch 1: TTFT {r['ttft_s'] * 1e3:.0f} ms, "
              f"{r['time_per_output_token_s'] * 1e3:.1f} ms/token, "
              f"peak {r['peak_gpu_bytes'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
