"""Training the embedded tiny MoE: a Qwen3-MoE built and trained with transformers' own class, so
that transformers loads the result as the reference and our loader reads it like any checkpoint.

The router's load-balancing loss (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961) is
transformers' `router_aux_loss_coef` term: it keeps every expert in use, while the language-model
loss lets experts specialise by domain.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_core.tiny_training.dataset import TokenData, WindowSampler

__all__ = ["TinyModelConfig", "TrainConfig", "measure_step_seconds", "train_tiny_model"]


@dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    """Shape of the tiny model (defaults: the shipped one, about 14M parameters, 28 MB in bf16)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 16
    top_k: int = 2
    expert_intermediate_size: int = 160
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TinyModelConfig.{name} must be positive")
        if self.top_k > self.num_experts:
            raise ValueError("TinyModelConfig.top_k must not exceed num_experts")

    def hf_config(self, vocab_size: int, eos_token_id: int, pad_token_id: int) -> Any:
        """The transformers `Qwen3MoeConfig` of this shape."""
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(  # type: ignore[call-arg]  # the stubs lag the config's fields
            vocab_size=vocab_size, hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, num_experts=self.num_experts,
            num_experts_per_tok=self.top_k, moe_intermediate_size=self.expert_intermediate_size,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False,
            tie_word_embeddings=self.tie_word_embeddings, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, bos_token_id=None,
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: Optimizer steps (the cosine schedule spans them).
        batch_size: Windows per step.
        seq_len: Tokens per window.
        learning_rate: Peak AdamW learning rate.
        min_lr_ratio: Final learning rate as a share of the peak.
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay (matrices only).
        grad_clip: Gradient-norm clip.
        seed: Seeds weights, batches and dropout-free kernels.
        time_budget_s: Stop early when training has run this long (None: never). A stop here is
            recorded in the log; the run is then not reproducible step for step.
        log_every: Steps between progress lines.
    """

    steps: int = 3000
    batch_size: int = 64
    seq_len: int = 512
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    time_budget_s: float | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive")
        if not 0 < self.learning_rate < 1:
            raise ValueError("TrainConfig.learning_rate must be in (0, 1)")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), fused=fused)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
          device: str, grad_clip: float) -> Any:
    """One optimizer step on `batch` `[B, L+1]` (bf16 autocast on CUDA); returns the output."""
    batch = batch.to(device, non_blocking=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        enabled=torch.device(device).type == "cuda"):
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return out


def train_tiny_model(data_dir: str | Path, out_dir: str | Path, *,
                     model_config: TinyModelConfig = TinyModelConfig(),
                     train_config: TrainConfig = TrainConfig(), device: str = "cuda",
                     progress: Callable[[str], None] = print) -> dict[str, object]:
    """Train from a prepared data folder and save a checkpoint folder to `out_dir`.

    The folder holds `config.json`, bf16 safetensors (shards under 15 MB), the tokenizer,
    `generation_config.json` and `training_log.json` (settings, loss curve, throughput).
    Returns the log.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    data = TokenData.open(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(data_dir) / "tokenizer"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(train_config.seed)
    hf_config = model_config.hf_config(len(tokenizer), tokenizer.eos_token_id,
                                       tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).to(device).train()
    on_cuda = torch.device(device).type == "cuda"
    optimizer = _optimizer(model, train_config, fused=on_cuda)
    sampler = WindowSampler(data, train_config.seq_len, train_config.batch_size,
                            train_config.seed)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    stopped_early = False
    step = 0
    for step in range(train_config.steps):
        for group in optimizer.param_groups:
            group["lr"] = train_config.lr_at(step)
        out = _step(model, optimizer, sampler.batch(), device, train_config.grad_clip)
        if step % train_config.log_every == 0 or step == train_config.steps - 1:
            aux = float(out.aux_loss.detach())
            lm = float(out.loss.detach()) - model_config.router_aux_loss_coef * aux
            elapsed = time.perf_counter() - start
            tokens = (step + 1) * train_config.batch_size * train_config.seq_len
            curve.append({"step": step, "lm_loss": lm, "aux_loss": aux, "elapsed_s": elapsed,
                          "tokens_per_s": tokens / elapsed})
            progress(f"step {step:5d}  lm loss {lm:.3f}  aux {aux:.3f}  "
                     f"{tokens / elapsed:,.0f} tok/s  {elapsed:.0f} s")
        if (train_config.time_budget_s is not None
                and time.perf_counter() - start > train_config.time_budget_s):
            stopped_early = True
            progress(f"time budget reached after {step + 1} steps")
            break
    elapsed = time.perf_counter() - start

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.bfloat16).save_pretrained(out_dir, max_shard_size="15MB")
    tokenizer.save_pretrained(str(out_dir))
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, im_end],
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(out_dir)
    shutil.copy(Path(data_dir) / "manifest.json", out_dir / "data_manifest.json")
    log = {
        "model_config": asdict(model_config), "train_config": asdict(train_config),
        "steps_done": step + 1, "stopped_early": stopped_early, "train_seconds": elapsed,
        "tokens_seen": (step + 1) * train_config.batch_size * train_config.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__, "curve": curve,
    }
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def measure_step_seconds(data_dir: str | Path, *, model_config: TinyModelConfig = TinyModelConfig(),
                         train_config: TrainConfig = TrainConfig(), device: str = "cuda",
                         steps: int = 30) -> float:
    """Seconds per training step on this machine: a throwaway model trained for `steps` steps;
    the median of the second half (after compilation and allocator warm-up).

    Used to choose `TrainConfig.steps` for a time budget before the real, seeded run starts, so
    that the run itself stays reproducible given its recorded step count.
    """
    from transformers import AutoModelForCausalLM

    data = TokenData.open(data_dir)
    vocab = int(data.manifest["vocab_size"])  # type: ignore[call-overload]
    hf_config = model_config.hf_config(vocab, int(data.manifest["eos_token_id"]),  # type: ignore[call-overload]
                                       int(data.manifest["pad_token_id"]))  # type: ignore[call-overload]
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).to(device).train()
    on_cuda = torch.device(device).type == "cuda"
    optimizer = _optimizer(model, train_config, fused=on_cuda)
    sampler = WindowSampler(data, train_config.seq_len, train_config.batch_size, seed=12345)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _step(model, optimizer, sampler.batch(), device, train_config.grad_clip)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    second_half = sorted(times[steps // 2 :])
    return second_half[len(second_half) // 2]
