"""Quality cost of FP8 experts (issue 18, item 2) on the embedded tiny-moe: held-out perplexity
per domain and logits error, the routed experts stored as e4m3 with a float32 scale per output
channel and run through moe-gen's streaming path (dequantised before the products), against
the same model with its experts in float32 (the reference) and rounded to bf16.

Held-out text: the documents `moe-core train-tiny prepare` holds out of training (the same
`read_corpus` split), tokenised with the model's own tokenizer; the first `--tokens` of each
domain, in windows of 256. Runs on the CPU in float32 (the products; only the expert storage
differs), so the figures hold on any machine.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 \\
        benchmarks/fp8_expert_quality.py --corpus ../shared/corpus --out r.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from moe_core import load_model, load_tokenizer, tiny_model_path
from moe_core.tiny_training.corpus import read_corpus
from moe_core.tiny_training.evaluation import heldout_perplexity, heldout_windows
from moe_gen import Plan
from moe_gen.model_setup import install_streaming

SEQ_LEN = 256


def variant(name: str) -> torch.nn.Module:
    """The embedded model with its experts as `name` stores them, experts streamed on the CPU."""
    model = load_model(tiny_model_path(), dtype="float32")
    plan = Plan(max_batch_size=16, micro_batch_size=16, max_prefill_tokens=4096, page_tokens=16,
                num_kv_pages=16, offload=False)
    if name == "bf16":  # bf16-rounded experts, computed in float32 like the others
        with torch.no_grad():
            for block in model.moe_blocks():
                for p in block.experts.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
    return install_streaming(model, plan, "cpu", fp8_experts=name == "fp8").model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=8192, help="Scored tokens per domain.")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_path())
    texts = read_corpus(args.corpus)
    heldout = {d: np.asarray(tokenizer("\n\n".join(t.heldout))["input_ids"], dtype=np.int64)
               for d, t in texts.items()}
    models = {name: variant(name) for name in ("fp32", "bf16", "fp8")}
    results: dict[str, dict[str, float]] = {}
    for domain, tokens in heldout.items():
        windows = torch.from_numpy(heldout_windows(tokens, SEQ_LEN, args.tokens))[:, :-1]
        row: dict[str, float] = {}
        with torch.no_grad():
            reference = models["fp32"](windows[:8]).float()  # [B, T, V]
        for name, model in models.items():
            _, ppl, n = heldout_perplexity(model, tokens, SEQ_LEN, args.tokens)  # type: ignore[arg-type]
            row[f"{name}_perplexity"] = ppl
            row["tokens"] = n
            if name == "fp32":
                continue
            with torch.no_grad():
                logits = model(windows[:8]).float()
            diff = (logits - reference).abs()
            kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                          reduction="none").sum(-1).mean()
            row[f"{name}_logits_max_abs_err"] = float(diff.max())
            row[f"{name}_logits_mean_abs_err"] = float(diff.mean())
            row[f"{name}_top1_agreement"] = float(
                (logits.argmax(-1) == reference.argmax(-1)).float().mean())
            row[f"{name}_kl_nats"] = float(kl)
            row[f"{name}_perplexity_delta_pct"] = 100 * (ppl / row["fp32_perplexity"] - 1)
        results[domain] = row
        print(domain, {k: round(v, 5) for k, v in row.items()}, flush=True)
    logit_scale = float(reference.abs().mean())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    record = {"script": "benchmarks/fp8_expert_quality.py", "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "model": "tiny-moe (embedded)", "seq_len": SEQ_LEN,
              "mean_abs_logit_last_domain": logit_scale, "domains": results,
              "mean_fp8_perplexity_delta_pct": sum(r["fp8_perplexity_delta_pct"]
                                                   for r in results.values()) / len(results),
              "geomean_note": "perplexity deltas are relative to the float32-expert model"}
    assert all(math.isfinite(v) for r in results.values() for v in r.values())
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
