"""`moe-core train-tiny`: the recipe of the embedded tiny model, step by step.

    moe-core train-tiny prepare --corpus ../shared/corpus --out .cache/tiny-data
    moe-core train-tiny fit --data .cache/tiny-data --out .cache/tiny-model --time-budget 420
    moe-core train-tiny evaluate .cache/tiny-model --data .cache/tiny-data --out docs/tiny-model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["train_app"]

train_app = typer.Typer(help="Train the embedded tiny MoE: prepare data, fit, evaluate.",
                        no_args_is_help=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@train_app.command()
def prepare(
    corpus: Annotated[Path, typer.Option(help="The corpus folder (see its MANIFEST.md).")],
    out: Annotated[Path, typer.Option(help="Data folder to write.")] = Path(".cache/tiny-data"),
    vocab_size: Annotated[int, typer.Option(min=256, max=65535)] = 4096,
    max_chars_per_domain: Annotated[int, typer.Option(min=10_000)] = 6_000_000,
) -> None:
    """Read the corpus and the standard library, train the tokenizer, write token arrays."""
    from moe_core.tiny_training.corpus import read_corpus
    from moe_core.tiny_training.dataset import write_token_data
    from moe_core.tiny_training.tokenizer_training import train_tokenizer

    texts = read_corpus(corpus, max_chars_per_domain=max_chars_per_domain)
    _log(f"read {len(texts)} domains; training a {vocab_size}-token BPE tokenizer")
    tokenizer = train_tokenizer(texts, out / "tokenizer", vocab_size=vocab_size)
    manifest = write_token_data(texts, tokenizer, out)
    print(json.dumps(manifest["tokens"]))


@train_app.command()
def fit(
    data: Annotated[Path, typer.Option(help="Data folder from `prepare`.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    steps: Annotated[int | None, typer.Option(
        min=1, help="Optimizer steps; default: as many as fit --time-budget.")] = None,
    time_budget: Annotated[float, typer.Option(
        help="Seconds of training to plan for when --steps is not given.")] = 420.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    seq_len: Annotated[int, typer.Option(min=8)] = 512,
    seed: int = 0,
    device: str = "cuda",
) -> None:
    """Train the tiny model (a seeded run of a fixed number of steps) and save it."""
    from moe_core.tiny_training.trainer import TrainConfig, measure_step_seconds, train_tiny_model

    config = TrainConfig(batch_size=batch_size, seq_len=seq_len, seed=seed)
    if steps is None:
        step_s = measure_step_seconds(data, train_config=config, device=device)
        steps = max(1, int(time_budget / step_s))
        _log(f"{step_s * 1e3:.1f} ms per step: planning {steps} steps for {time_budget:.0f} s")
    config = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                         warmup_steps=min(150, max(1, steps // 10)),
                         time_budget_s=1.15 * time_budget)
    log = train_tiny_model(data, out, train_config=config, device=device, progress=_log)
    print(json.dumps({k: log[k] for k in ("steps_done", "train_seconds", "tokens_seen",
                                          "parameters", "device", "stopped_early")}))


@train_app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Trained checkpoint folder.")],
    data: Annotated[Path, typer.Option(help="Data folder from `prepare` (held-out splits).")],
    out: Annotated[Path, typer.Option(help="Folder for evaluation.json and routing.png.")],
    seq_len: Annotated[int, typer.Option(min=8)] = 512,
    max_tokens_per_domain: Annotated[int, typer.Option(min=1)] = 32_768,
) -> None:
    """Held-out perplexity per domain against a unigram baseline, routing per domain (heat map,
    Jensen-Shannon divergence) and sample generations."""
    from moe_core.tiny_training.evaluation import EvaluationConfig, evaluate_tiny_model

    report = evaluate_tiny_model(model, data, out, config=EvaluationConfig(
        seq_len=seq_len, max_tokens_per_domain=max_tokens_per_domain))
    per_domain = report["per_domain"]
    assert isinstance(per_domain, dict)
    summary = {d: {k: round(v, 3) for k, v in r.items() if k != "tokens"}
               for d, r in per_domain.items()}
    print(json.dumps({"per_domain": summary,
                      "mean_js": report["routing"]["mean_js"]}))  # type: ignore[index]
