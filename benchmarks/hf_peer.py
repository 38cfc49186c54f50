"""The peer baseline of BENCHMARKS.md: Hugging Face transformers + accelerate with
`device_map="auto"` under the same GPU budget (its weights budget 2 GiB under it, left for KV
and activations), its largest batch that fits, tiled random bf16 weights.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch
from dummy_weights import noise, tile_into
from moe_core import parse_bytes, resolve_model_path

__all__ = ["random_peer_model", "run_peer"]


def random_peer_model(config: Any) -> Any:
    """transformers' model with tiled random bf16 weights on the host (as offload_decode.py)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    block = noise()
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        tile_into(value.view(-1), block)
        set_module_tensor_to_device(model, name, "cpu", value=value)
    return model.eval()


def run_peer(args: argparse.Namespace, name: str, layers: int | None,
             budget: str) -> dict[str, Any]:
    """Largest batch (of --peer-batches) that fits, prefill then timed decode steps."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name, weights=False))
    config.num_hidden_layers = layers or config.num_hidden_layers
    model = random_peer_model(config)
    weights_budget = parse_bytes(budget) - 2 * 2**30  # 2 GiB left for KV and activations
    device_map = infer_auto_device_map(model, max_memory={0: weights_budget, "cpu": "120GiB"},
                                       no_split_module_classes=model._no_split_modules)
    model = dispatch_model(model, device_map=device_map)
    out: dict[str, Any] = {"system": "transformers+accelerate device_map=auto",
                           "weights_budget": weights_budget, "tried": {}}
    for batch in args.peer_batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            prompt = torch.randint(3, config.vocab_size, (batch, args.prompt_tokens),
                                   device="cuda")
            with torch.inference_mode():
                t0 = time.perf_counter()
                res = model(prompt, use_cache=True)
                torch.cuda.synchronize()
                prefill_s = time.perf_counter() - t0
                past, token = res.past_key_values, res.logits[:, -1:].argmax(-1)
                del res
                times = []
                for _ in range(args.peer_steps):
                    t0 = time.perf_counter()
                    res = model(token, past_key_values=past, use_cache=True)
                    past, token = res.past_key_values, res.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del res
            step = statistics.median(times)
            out.update(batch=batch, prefill_s=prefill_s, prefill_tokens_per_s=batch
                       * args.prompt_tokens / prefill_s, decode_step_median_s=step,
                       decode_tokens_per_s=batch / step,
                       peak_allocated_bytes=torch.cuda.max_memory_allocated())
            del past, token
            break
        except torch.OutOfMemoryError as exc:
            out["tried"][batch] = f"OOM: {str(exc).splitlines()[0][:120]}"
            gc.collect()
            torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out

