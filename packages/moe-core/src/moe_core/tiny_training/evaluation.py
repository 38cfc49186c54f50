"""Evaluation of the tiny MoE: held-out perplexity per domain against a unigram baseline, how
domain-dependent its routing is (a Jensen-Shannon matrix and a PNG heat map), and greedy samples.

Dimension key: N windows, B batch, T tokens per window, V vocabulary, L MoE layers, E experts.

Perplexity is measured on non-overlapping windows of `T + 1` tokens spaced evenly over a domain's
held-out array: each window predicts its last T tokens from what precedes them inside the
window, so every scored token is scored once, with between 1 and T tokens of context (the
training windows cross document boundaries the same way).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from moe_core.loader import load_model
from moe_core.model import MoEForCausalLM
from moe_core.tiny_training.dataset import TokenData
from moe_core.tiny_training.heatmap_png import routing_heatmap, write_png
from moe_core.tiny_training.routing_stats import (
    RoutingCounter,
    mean_over_pairs,
    pairwise_js,
    routing_shares,
)
from moe_core.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_PROMPTS", "EvaluationConfig", "GeneratedSample", "evaluate_tiny_model",
           "heldout_perplexity", "heldout_windows", "sample_generations", "unigram_perplexity"]

DEFAULT_PROMPTS: dict[str, str] = {
    "stories": "Once upon a time, there was a little fox who",
    "math": ("<|im_start|>user\nA baker makes 12 muffins in the morning and 18 in the afternoon. "
             "He sells 25 of them. How many muffins are left?<|im_end|>\n<|im_start|>assistant\n"),
    "plays": "JULIET:\n",
    "de": "Am nächsten Morgen ging sie",
    "fr": "Le lendemain matin, le comte",
    "es": "Al día siguiente, el capitán",
    "code": 'def read_lines(path):\n    """Return the lines of the file at *path*."""\n',
}
"""One prompt per domain of the corpus (the math one in the chat format of its training data)."""


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Settings of `evaluate_tiny_model`.

    Attributes:
        seq_len: Tokens scored per window (T).
        max_tokens_per_domain: Cap on the scored tokens of each domain's held-out array.
        batch_size: Windows per forward pass.
        max_new_tokens: Length of each greedy sample.
        device: Where the model runs.
        dtype: Model dtype; float32 by default, so the figures do not depend on the device.
    """

    seq_len: int = 256
    max_tokens_per_domain: int = 32_768
    batch_size: int = 16
    max_new_tokens: int = 64
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_tokens_per_domain", "batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvaluationConfig.{name} must be positive")
        if self.max_tokens_per_domain < self.seq_len:
            raise ValueError("EvaluationConfig.max_tokens_per_domain must be at least seq_len")


@dataclass(frozen=True)
class GeneratedSample:
    """One greedy continuation.

    Attributes:
        prompt: The prompt text.
        completion: The new text (special tokens dropped).
        num_new_tokens: New tokens, an EOS included.
        finish_reason: `"eos"` or `"length"`.
    """

    prompt: str
    completion: str
    num_new_tokens: int
    finish_reason: str


def heldout_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows `[N, T + 1]` int64 of a 1-D token array, spaced evenly over it.

    Window n is `tokens[s_n : s_n + T + 1]` with `s_n` a multiple of T, so consecutive windows
    share at most one token (the last target of one is the first input of the next) and no
    token is a target twice.

    Args:
        tokens: Token ids, 1-D.
        seq_len: T, the targets per window.
        max_tokens: Keep at most this many targets (`max_tokens // T` windows); None: all.

    Raises:
        ValueError: not 1-D, or too short for one window within `max_tokens`.
    """
    if tokens.ndim != 1 or seq_len <= 0:
        raise ValueError(f"need 1-D tokens and seq_len > 0, got shape {tokens.shape}, {seq_len}")
    available = (tokens.size - 1) // seq_len
    count = available if max_tokens is None else min(available, max_tokens // seq_len)
    if count <= 0:
        raise ValueError(f"{tokens.size} tokens (cap {max_tokens}) give no window of "
                         f"{seq_len + 1} tokens")
    starts = (np.arange(count) * available // count) * seq_len  # [N], distinct: available >= N
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [N, T + 1]
    return np.asarray(tokens[index], dtype=np.int64)


@torch.no_grad()
def heldout_perplexity(model: MoEForCausalLM, tokens: np.ndarray, seq_len: int = 256,
                       max_tokens: int | None = 32_768,
                       batch_size: int = 16) -> tuple[float, float, int]:
    """Next-token cross-entropy of `model` on held-out tokens (windows: `heldout_windows`).

    Args:
        model: The model (routing observers on its MoE blocks see every window).
        tokens: Token ids, 1-D.
        seq_len: Targets per window.
        max_tokens: Cap on the scored tokens; None: the whole array.
        batch_size: Windows per forward pass.

    Returns:
        `(mean_loss_nats, perplexity, n_tokens)`: mean loss per scored token, its exponential,
        and how many tokens were scored.
    """
    windows = heldout_windows(tokens, seq_len, max_tokens)  # [N, T + 1]
    total_nats = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size]).to(model.device)  # [B, T+1]
        logits = model(batch[:, :-1])  # [B, T, V]
        total_nats += float(F.cross_entropy(logits.float().flatten(0, 1),  # [B*T, V]
                                            batch[:, 1:].flatten(), reduction="sum"))
    n_tokens = windows.shape[0] * seq_len
    mean_loss = total_nats / n_tokens
    return mean_loss, math.exp(mean_loss), n_tokens


def unigram_perplexity(train_tokens: np.ndarray, heldout_tokens: np.ndarray,
                       vocab_size: int) -> float:
    """Perplexity on `heldout_tokens` of the add-one (Laplace) smoothed unigram model of
    `train_tokens`: `p(v) = (count(v) + 1) / (n_train + vocab_size)`.

    Raises:
        ValueError: a token id outside `[0, vocab_size)`, or no held-out tokens.
    """
    train = np.asarray(train_tokens, dtype=np.int64).ravel()
    heldout = np.asarray(heldout_tokens, dtype=np.int64).ravel()
    if heldout.size == 0:
        raise ValueError("unigram_perplexity needs at least one held-out token")
    for name, ids in (("train", train), ("held-out", heldout)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} token ids must lie in [0, {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size)  # [V]
    log_probs = np.log(counts + 1.0) - np.log(train.size + vocab_size)  # [V]
    return float(np.exp(-log_probs[heldout].mean()))


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt tokens after an EOS: every training document follows one, so it marks a start."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    return ([eos] if isinstance(eos, int) else []) + ids


def sample_generations(model: MoEForCausalLM, tokenizer: PreTrainedTokenizerBase,
                       prompts: Mapping[str, str],
                       max_new_tokens: int = 64) -> dict[str, GeneratedSample]:
    """Greedy continuations of each named prompt (one batched `generate` call).

    Each prompt is encoded without special tokens added and preceded by the EOS token (the
    context every training document starts from); special tokens written in the prompt text
    (e.g. `<|im_start|>`) are kept.
    """
    if not prompts:
        return {}
    names = list(prompts)
    rows = [_prompt_ids(tokenizer, prompts[name]) for name in names]
    result = model.generate_full(rows, max_new_tokens=max_new_tokens, temperature=0.0)
    samples = {}
    for i, name in enumerate(names):
        new_ids = result.tokens[i, : result.lengths[i]].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence decodes to one string
        samples[name] = GeneratedSample(prompts[name], text,
                                        result.lengths[i], result.finish_reasons[i])
    return samples


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _manifest_int(data: TokenData, key: str) -> int:
    value = data.manifest.get(key)
    if not isinstance(value, int):
        raise ValueError(f"{data.folder / 'manifest.json'}: {key!r} must be an integer")
    return value


def _evaluate_domain(model: MoEForCausalLM, data: TokenData, domain: str, vocab_size: int,
                     config: EvaluationConfig) -> tuple[dict[str, float | int], np.ndarray]:
    """Loss figures of one domain, and its routing counts `[L, E]` on the same windows."""
    heldout = data.tokens(domain, "heldout")
    with RoutingCounter(model) as counter:
        loss, ppl, n_tokens = heldout_perplexity(model, heldout, config.seq_len,
                                                 config.max_tokens_per_domain, config.batch_size)
    # The baseline is scored on exactly the tokens the model was scored on.
    targets = heldout_windows(heldout, config.seq_len, config.max_tokens_per_domain)[:, 1:]
    unigram = unigram_perplexity(data.tokens(domain, "train"), targets, vocab_size)
    figures: dict[str, float | int] = {"loss_nats": loss, "perplexity": ppl,
                                       "unigram_perplexity": unigram,
                                       "unigram_loss_nats": math.log(unigram), "tokens": n_tokens}
    return figures, counter.counts


def _routing_report(counts: Mapping[str, np.ndarray], model: MoEForCausalLM,
                    png_path: Path) -> dict[str, object]:
    """JS figures of the domains' routing, and the heat map written to `png_path`."""
    shares = [routing_shares(c) for c in counts.values()]  # D x [L, E]
    js = pairwise_js(shares)  # [D, D, L]
    max_share = float(max(s.max() for s in shares))
    write_png(png_path, routing_heatmap(shares, vmax=max_share))
    return {
        "moe_layers": list(model.spec.moe_layers), "num_experts": model.spec.moe.num_experts,
        "top_k": model.spec.moe.router.top_k,
        "counts": {domain: c.tolist() for domain, c in counts.items()},
        "js_matrix": js.mean(axis=2).tolist(),
        # Undefined (null) for a single domain: there is no pair to compare.
        "mean_js": float(mean_over_pairs(js.mean(axis=2))) if len(shares) > 1 else None,
        "js_by_layer": mean_over_pairs(js).tolist() if len(shares) > 1 else None,
        "heatmap": png_path.name, "heatmap_max_share": max_share,
    }


def evaluate_tiny_model(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                        config: EvaluationConfig = EvaluationConfig(),
                        prompts: Mapping[str, str] | None = None,
                        progress: Callable[[str], None] = _log_to_stderr) -> dict[str, object]:
    """Evaluate a trained checkpoint on every domain of a data folder.

    Writes `{out_dir}/routing.png` (the heat map: one panel per domain in manifest order, rows
    MoE layers, columns experts, viridis colour from share 0 to `heatmap_max_share`, with that
    ramp as a bar underneath) and `{out_dir}/evaluation.json` (the returned report).

    Args:
        model_dir: The checkpoint folder (with its tokenizer).
        data_dir: The data folder (`manifest.json`, `{domain}.{train,heldout}.npy`).
        out_dir: Where to write the files (created if needed).
        config: Window, batch and sample settings.
        prompts: Named prompts to sample greedily (default: `DEFAULT_PROMPTS`).
        progress: Receives one line per step (default: stderr).

    Returns:
        The report: `domains` (manifest order), `per_domain` (`loss_nats`, `perplexity`,
        `unigram_perplexity`, `unigram_loss_nats`, `tokens` per domain), `routing`
        (`moe_layers`, `num_experts`, `top_k`, `counts` `[L, E]` per domain, `js_matrix`
        `[D, D]` of layer-mean JS in bits, `mean_js` over domain pairs and `js_by_layer` `[L]`
        (both null for a single domain), `heatmap`, `heatmap_max_share`), `samples` (per prompt
        name: `prompt`, `completion`, `num_new_tokens`, `finish_reason`), `settings`,
        `model_dir`, `data_dir`, `elapsed_s`.

    Raises:
        InputFileError: no manifest in `data_dir`.
        ValueError: the data's vocabulary does not fit the model, or a held-out array is too
            short for one window.
    """
    start = time.perf_counter()
    data = TokenData.open(data_dir)
    vocab_size = _manifest_int(data, "vocab_size")
    model = load_model(model_dir, device=config.device, dtype=config.dtype)
    if vocab_size > model.spec.vocab_size:
        raise ValueError(f"data vocabulary of {vocab_size} exceeds the model's "
                         f"{model.spec.vocab_size}")
    progress(f"evaluating {model_dir} on {len(data.domains)} domains ({config.device})")
    per_domain: dict[str, dict[str, float | int]] = {}
    counts: dict[str, np.ndarray] = {}
    for domain in data.domains:
        t0 = time.perf_counter()
        per_domain[domain], counts[domain] = _evaluate_domain(model, data, domain, vocab_size,
                                                              config)
        f = per_domain[domain]
        progress(f"{domain:>8}: loss {f['loss_nats']:.3f} nats, perplexity {f['perplexity']:.1f} "
                 f"(unigram {f['unigram_perplexity']:.1f}), {f['tokens']:,} tokens, "
                 f"{time.perf_counter() - t0:.1f} s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    routing = _routing_report(counts, model, out / "routing.png")
    if routing["mean_js"] is not None:
        progress(f"routing: mean JS divergence between domains {routing['mean_js']:.3f} bits")
    samples = sample_generations(model, load_tokenizer(model_dir),
                                 DEFAULT_PROMPTS if prompts is None else prompts,
                                 config.max_new_tokens)
    report: dict[str, object] = {
        "model_dir": str(model_dir), "data_dir": str(data_dir), "settings": asdict(config),
        "domains": list(data.domains), "per_domain": per_domain, "routing": routing,
        "samples": {name: asdict(sample) for name, sample in samples.items()},
        "elapsed_s": time.perf_counter() - start,
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    progress(f"wrote {out / 'evaluation.json'} and {out / 'routing.png'} "
             f"in {report['elapsed_s']:.0f} s")
    return report
