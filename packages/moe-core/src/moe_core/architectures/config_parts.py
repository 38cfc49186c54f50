"""Config readers shared by several families: GQA attention, plain rotary, the common header."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from moe_core.errors import ConfigError
from moe_core.hf_config import HFConfig
from moe_core.spec import AttentionSpec, RopeSpec

__all__ = ["common_fields", "gqa_attention", "rope", "spec_errors"]


@contextmanager
def spec_errors(config: HFConfig) -> Iterator[None]:
    """Report a spec's own validation failure (a `ValueError`) as a `ConfigError`.

    The `ConfigError` names the config file.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {exc}") from exc


def gqa_attention(config: HFConfig, **overrides: Any) -> AttentionSpec:
    """Grouped-query attention from the usual fields (`num_attention_heads`, `head_dim`, ...)."""
    hidden = config.get_int("hidden_size")
    heads = config.get_int("num_attention_heads")
    kv_heads = config.get_int("num_key_value_heads", default=heads)
    head_dim = config.get("head_dim") or hidden // heads
    fields: dict[str, Any] = {
        "kind": "gqa",
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "v_head_dim": head_dim,
    }
    fields.update(overrides)
    return AttentionSpec(**fields)


def rope(config: HFConfig, rotary_dim: int, *, interleaved: bool = False,
         default_theta: float = 10000.0) -> RopeSpec:
    """Rotary settings from `rope_theta` / `rope_scaling` / `rope_parameters`; `default_theta`
    is the family's default when the config names none.

    Raises:
        ConfigError: a scaling type we do not implement.
    """
    params = config.rope_parameters(default_theta)
    kind = params["rope_type"]
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(f"{config.source}: rope scaling {kind!r} is not supported "
                          "(supported: default, linear, yarn)")
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None and kind == "yarn" and original:
        # DeepSeek-V3-style configs give the extension only through the two lengths.
        factor = config.get_int("max_position_embeddings") / original
    if kind == "yarn" and not original:
        raise ConfigError(f"{config.source}: yarn rope scaling needs "
                          "'original_max_position_embeddings'")
    return RopeSpec(
        theta=float(params["rope_theta"]),
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        scaling=kind,
        factor=float(factor or 1.0),
        original_max_position_embeddings=int(original) if original else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def common_fields(config: HFConfig) -> dict[str, Any]:
    """The `ModelSpec` fields every family reads the same way."""
    return {
        "architecture": config.architecture(),
        "model_type": str(config.get("model_type", default="")),
        "vocab_size": config.get_int("vocab_size"),
        "hidden_size": config.get_int("hidden_size"),
        "num_layers": config.get_int("num_hidden_layers"),
        "rms_norm_eps": config.get_float("rms_norm_eps", default=1e-6),
        "tie_word_embeddings": config.get_bool("tie_word_embeddings", default=False),
        "max_position_embeddings": config.get_int("max_position_embeddings", default=4096),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_ids": config.eos_token_ids(),
        "pad_token_id": config.get("pad_token_id"),
        "torch_dtype": config.get("dtype", "torch_dtype"),
        "initializer_range": config.get_float("initializer_range", default=0.02),
    }
