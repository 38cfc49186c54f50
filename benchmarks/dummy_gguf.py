"""A GGUF of dummy weights for llama.cpp (arch `qwen3moe`) from a moe-core `ModelSpec`: random
bf16 matrices of the spec's shapes, written tensor by tensor (the S3 file is about 31 GB; one
tensor is in memory at a time), and a byte-level BPE vocabulary that llama-server accepts.

`--gguf-type q8_0` stores the weight matrices in GGML's 8-bit Q8_0 blocks instead (ggml_q8_0.py;
the S3 file is about 16 GB), the peer of our 8-bit experts. It keeps in float32 what
`llama-quantize ... Q8_0` keeps: the norms (1-D) and the routers (`ffn_gate_inp`); the token
embedding, attention, experts and LM head become Q8_0 (a matrix whose rows are not a multiple of
32 values would stay bf16). The values are the same N(0, std) draws, quantised exactly as
llama.cpp's reference does (per 32 values: d = max|x| / 127, q = round(x / d)).

The vocabulary: the 256 byte tokens of GPT-2's byte-level BPE, one token for each of moe-cap's
synthetic prompt words with and without a leading space (`Ġthe`), the tokens and merges that
build them (every split of every substring of a word is a merge, so BPE ends at one token per
word whatever order it merges in), control tokens for BOS/EOS and ASCII filler tokens (` w123`)
up to the spec's vocabulary size. A synthetic prompt of N words is then exactly N tokens, as on
the real Qwen3 tokenizer. Weights are N(0, std) (std: the spec's `initializer_range`, 0.02), so
activations stay finite; norms are ones; the router is float32 as converted checkpoints keep it.
Random numbers come from torch, on the GPU when there is one (fast: the GPU is idle while
llama.cpp compiles).

    python3 benchmarks/dummy_gguf.py qwen3-30b-a3b --num-layers 24 --out /dev/shm/s3.gguf
    python3 benchmarks/dummy_gguf.py qwen3-30b-a3b --num-layers 24 --gguf-type q8_0 \\
        --out /dev/shm/s3-q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from ggml_q8_0 import BLOCK_VALUES, q8_0_nbytes, quantize_q8_0
from moe_core import ModelSpec, resolve_model_path

if TYPE_CHECKING:  # imported where used: the size of a plan needs no gguf package
    import gguf

# Dimension keys: V vocab, H hidden, E experts, F expert ffn, Q = heads*head_dim, K = kv*head_dim.

GGUF_TYPES = ("bf16", "q8_0")  # what the weight matrices are stored as (`--gguf-type`)


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: name, numpy shape (GGUF stores it reversed) and what fills it."""

    name: str
    shape: tuple[int, ...]
    fill: str  # "bf16" or "q8_0" random, "router" float32 random, "ones" float32

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """The tensor's bytes in the file (before the alignment padding)."""
        if self.fill == "q8_0":
            return q8_0_nbytes(self.num_elements)
        return self.num_elements * (2 if self.fill == "bf16" else 4)


def tensor_plan(spec: ModelSpec, gguf_type: str = "bf16") -> list[TensorPlan]:
    """Every tensor llama.cpp's qwen3moe loader creates, in file order, its weight matrices
    stored as `gguf_type`.

    Raises:
        ValueError: `gguf_type` is not one of `GGUF_TYPES`.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")

    def weight(name: str, shape: tuple[int, ...]) -> TensorPlan:
        # Q8_0 blocks run along the rows (the last numpy axis, GGUF's ne[0]).
        whole_blocks = shape[-1] % BLOCK_VALUES == 0
        return TensorPlan(name, shape, gguf_type if whole_blocks else "bf16")

    a, h, v = spec.attention, spec.hidden_size, spec.vocab_size
    q, k, e, f = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, \
        spec.moe.num_experts, spec.moe.expert_intermediate_size
    plan = [weight("token_embd.weight", (v, h))]  # [V, H]
    for i in range(spec.num_layers):
        b = f"blk.{i}."
        plan += [TensorPlan(b + "attn_norm.weight", (h,), "ones"),
                 weight(b + "attn_q.weight", (q, h)),  # [Q, H]
                 weight(b + "attn_k.weight", (k, h)),  # [K, H]
                 weight(b + "attn_v.weight", (k, h)),  # [K, H]
                 weight(b + "attn_output.weight", (h, q)),  # [H, Q]
                 TensorPlan(b + "attn_q_norm.weight", (a.head_dim,), "ones"),
                 TensorPlan(b + "attn_k_norm.weight", (a.head_dim,), "ones"),
                 TensorPlan(b + "ffn_norm.weight", (h,), "ones"),
                 TensorPlan(b + "ffn_gate_inp.weight", (e, h), "router"),  # [E, H]
                 weight(b + "ffn_gate_exps.weight", (e, f, h)),  # [E, F, H]
                 weight(b + "ffn_up_exps.weight", (e, f, h)),  # [E, F, H]
                 weight(b + "ffn_down_exps.weight", (e, h, f))]  # [E, H, F]
    plan += [TensorPlan("output_norm.weight", (h,), "ones"),
             weight("output.weight", (v, h))]  # [V, H]
    return plan


def _byte_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


@dataclass(frozen=True)
class Vocab:
    """Token strings, their types (1 normal, 3 control), merges, BOS and EOS ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int


def build_vocab(vocab_size: int, words: Sequence[str]) -> Vocab:
    """The byte-level BPE vocabulary described in the module docstring.

    Raises:
        ValueError: `vocab_size` cannot hold the bytes, the words and two control tokens.
    """
    tokens = _byte_unicode()
    seen = set(tokens)
    merges: list[str] = []
    merge_seen: set[str] = set()
    space = _byte_unicode()[ord(" ")]  # "Ġ"
    for word in words:
        for form in (word, space + word):
            for n in range(2, len(form) + 1):
                for start in range(len(form) - n + 1):
                    piece = form[start:start + n]
                    if piece not in seen:
                        seen.add(piece)
                        tokens.append(piece)
                    for cut in range(1, n):
                        merge = f"{piece[:cut]} {piece[cut:]}"
                        if merge not in merge_seen:
                            merge_seen.add(merge)
                            merges.append(merge)
    if vocab_size < len(tokens) + 2:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(tokens)} byte and word "
                         f"tokens and BOS/EOS")
    num_filler = vocab_size - len(tokens) - 2
    tokens += [f"{space}w{i}" for i in range(num_filler)]
    tokens += ["<|endoftext|>", "<|im_end|>"]
    types = [1] * (vocab_size - 2) + [3, 3]
    return Vocab(tokens, types, merges, bos_id=vocab_size - 2, eos_id=vocab_size - 1)


def _random_fill(plan: TensorPlan, std: float, generator: torch.Generator,
                 device: str) -> np.ndarray:
    """The tensor's values: bf16 bits as uint16, Q8_0 blocks as uint8, or float32."""
    if plan.fill == "ones":
        return np.ones(plan.shape, dtype=np.float32)
    values = torch.randn(plan.num_elements, generator=generator, device=device,
                         dtype=torch.float32).mul_(std)
    if plan.fill == "router":
        return values.cpu().numpy().reshape(plan.shape)
    if plan.fill == "q8_0":  # [rows, row bytes]: the byte shape the GGUF writer takes
        return quantize_q8_0(values).reshape(*plan.shape[:-1], -1)
    return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16) \
        .reshape(plan.shape)


def _add_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, vocab: Vocab,
                  context_length: int, gguf_type: str) -> None:
    import gguf
    a = spec.attention
    writer.add_name(f"dummy {spec.architecture} {spec.num_layers} layers")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0"
                         else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_context_length(context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.dense_intermediate_size)
    writer.add_expert_feed_forward_length(spec.moe.expert_intermediate_size)
    writer.add_head_count(a.num_heads)
    writer.add_head_count_kv(a.num_kv_heads)
    writer.add_key_length(a.head_dim)
    writer.add_value_length(a.v_head_dim)
    writer.add_rope_dimension_count(spec.rope.rotary_dim)
    writer.add_rope_freq_base(spec.rope.theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_count(spec.moe.num_experts)
    writer.add_expert_used_count(spec.moe.router.top_k)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)


def write_gguf(spec: ModelSpec, path: Path, words: Sequence[str], seed: int = 0,
               context_length: int = 40960, log: bool = True, gguf_type: str = "bf16") -> int:
    """Write the dummy GGUF of `spec` to `path` (replaced), its weight matrices stored as
    `gguf_type` ("bf16" or "q8_0"); returns its size in bytes."""
    import gguf
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = build_vocab(spec.vocab_size, words)
    plan = tensor_plan(spec, gguf_type)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "qwen3moe")
    _add_metadata(writer, spec, vocab, context_length, gguf_type)
    types = {"bf16": (np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16),
             "q8_0": (np.dtype(np.uint8), gguf.GGMLQuantizationType.Q8_0),
             "router": (np.dtype(np.float32), None), "ones": (np.dtype(np.float32), None)}
    for t in plan:
        dtype, raw = types[t.fill]
        # Q8_0 goes in as bytes, [..., row bytes]; the writer turns that into the value shape.
        shape = (*t.shape[:-1], q8_0_nbytes(t.shape[-1])) if t.fill == "q8_0" else t.shape
        writer.add_tensor_info(t.name, shape, dtype, t.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    started, done = time.perf_counter(), 0
    for t in plan:
        writer.write_tensor_data(_random_fill(t, spec.initializer_range, generator, device))
        done += t.nbytes
        if log and t.nbytes > 1 << 28:
            print(f"{t.name}: {done / 2**30:.1f} GiB in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    writer.close()
    tmp.replace(path)
    return path.stat().st_size


def smoke_spec() -> ModelSpec:
    """A tiny qwen3moe for CPU checks: 2 layers, 8 experts top-2, hidden 64, 4/2 heads of 32
    (not hidden / heads, as in Qwen3: the GGUF must say so) and Qwen3's whole vocabulary."""
    config = shipped_config("qwen3-30b-a3b")
    config.update(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_window_layers=2)
    return ModelSpec.from_config(config)


def plan_bytes(spec: ModelSpec, gguf_type: str = "bf16") -> int:
    """The tensor data's bytes (the file is this plus the vocabulary and padding)."""
    return sum(t.nbytes for t in tensor_plan(spec, gguf_type))


def shipped_config(name: str) -> dict[str, object]:
    """A shipped shape's config.json as a dict (the base of the smoke shape)."""
    folder = resolve_model_path(name, weights=False)
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def load_spec(model: str, num_layers: int, smoke: bool) -> ModelSpec:
    """The spec to write: the shipped shape (truncated), or the tiny smoke shape."""
    if smoke:
        return smoke_spec()
    spec = ModelSpec.from_pretrained(resolve_model_path(model, weights=False))
    return spec.truncated(num_layers) if num_layers else spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="qwen3-30b-a3b")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--smoke", action="store_true", help="the tiny shape (CPU checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="bf16",
                   help="how the weight matrices are stored (q8_0: GGML's 8-bit blocks)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from moe_cap import SYNTHETIC_WORDS

    spec = load_spec(args.model, args.num_layers, args.smoke)
    started = time.perf_counter()
    size = write_gguf(spec, args.out, SYNTHETIC_WORDS, args.seed, gguf_type=args.gguf_type)
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
