"""Evaluation of the tiny model: perplexity is the model's own next-token loss on held-out
windows, the unigram baseline is add-one smoothed, Jensen-Shannon divergence behaves like one,
routing counts cover every token's top-k choices, and the heat map is a valid PNG.

Dimension key: N windows, T tokens per window, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_core import MoEForCausalLM, load_model
from moe_core.tiny_checkpoints import TINY_VOCAB, build_tiny_checkpoint
from moe_core.tiny_training.evaluation import (
    EvaluationConfig,
    evaluate_tiny_model,
    heldout_perplexity,
    heldout_windows,
    sample_generations,
    unigram_perplexity,
)
from moe_core.tiny_training.heatmap_png import (
    PNG_SIGNATURE,
    HeatmapLayout,
    colour_ramp,
    encode_png,
    routing_heatmap,
)
from moe_core.tiny_training.routing_stats import (
    RoutingCounter,
    js_divergence,
    mean_over_pairs,
    pairwise_js,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = 2
DOMAINS = ("low", "high", "mixed")
WORDS = ["<pad>", "<s>", "</s>", "once", "upon", "a", "time"]
SEQ_LEN = 16


def _domain_tokens(domain: str, size: int, seed: int) -> np.ndarray:
    """Random documents of 20-60 tokens joined by EOS; each domain draws from its own id range,
    so a model with token-dependent routing routes the domains differently."""
    low, high = {"low": (3, 40), "high": (50, TINY_VOCAB), "mixed": (3, TINY_VOCAB)}[domain]
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < size:
        out.extend(rng.integers(low, high, size=int(rng.integers(20, 60))).tolist())
        out.append(EOS)
    return np.asarray(out[:size], dtype=np.uint16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE (MoE layers 1 and 2, 6 experts, top-2) with a word-level tokenizer."""
    folder = build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                      unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MoEForCausalLM:
    return load_model(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for seed, domain in enumerate(DOMAINS):
        np.save(folder / f"{domain}.train.npy", _domain_tokens(domain, 2000, seed))
        np.save(folder / f"{domain}.heldout.npy", _domain_tokens(domain, 300, 100 + seed))
    manifest = {"domains": list(DOMAINS), "vocab_size": TINY_VOCAB, "eos_token_id": EOS,
                "pad_token_id": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _direct_loss(model: MoEForCausalLM, window: np.ndarray) -> float:
    """Mean next-token loss of one window `[T + 1]`, by log-softmax and gather."""
    ids = torch.from_numpy(window.astype(np.int64))[None]  # [1, T + 1]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)  # [1, T, V]
    return float(-log_probs.gather(-1, ids[:, 1:, None]).mean())


# --- Perplexity -------------------------------------------------------------------------------


def test_windows_are_non_overlapping_slices_spread_over_the_array() -> None:
    tokens = np.arange(200, dtype=np.uint16)
    windows = heldout_windows(tokens, SEQ_LEN, max_tokens=4 * SEQ_LEN)  # [N, T + 1]
    assert windows.shape == (4, SEQ_LEN + 1) and windows.dtype == np.int64
    starts = windows[:, 0]
    assert np.all(windows == starts[:, None] + np.arange(SEQ_LEN + 1))  # contiguous slices
    assert np.all(starts % SEQ_LEN == 0) and np.all(np.diff(starts) >= SEQ_LEN)
    assert starts[-1] > 100  # spread over the array, not its head only
    targets = windows[:, 1:].ravel()
    assert len(set(targets.tolist())) == targets.size  # no token scored twice
    assert heldout_windows(tokens, SEQ_LEN).shape == ((200 - 1) // SEQ_LEN, SEQ_LEN + 1)
    with pytest.raises(ValueError, match="no window"):
        heldout_windows(tokens[:SEQ_LEN], SEQ_LEN)


def test_perplexity_of_one_window_is_the_models_own_loss(model: MoEForCausalLM,
                                                         data_dir: Path) -> None:
    tokens = np.load(data_dir / "mixed.heldout.npy")
    loss, ppl, n_tokens = heldout_perplexity(model, tokens, SEQ_LEN, max_tokens=SEQ_LEN)
    assert n_tokens == SEQ_LEN
    assert loss == pytest.approx(_direct_loss(model, tokens[: SEQ_LEN + 1]), rel=1e-5)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-12)
    assert 1.0 < ppl < 10 * TINY_VOCAB  # a random model: far from perfect, not absurd


def test_batching_does_not_change_the_loss(model: MoEForCausalLM, data_dir: Path) -> None:
    tokens = np.load(data_dir / "low.heldout.npy")
    windows = heldout_windows(tokens, SEQ_LEN, max_tokens=5 * SEQ_LEN)
    expected = np.mean([_direct_loss(model, w) for w in windows])  # equal-length windows
    for batch_size in (1, 2, 5, 8):  # 2 leaves a ragged last batch
        loss, ppl, n_tokens = heldout_perplexity(model, tokens, SEQ_LEN, 5 * SEQ_LEN, batch_size)
        assert n_tokens == 5 * SEQ_LEN
        assert loss == pytest.approx(expected, rel=1e-5)
        assert ppl == pytest.approx(math.exp(loss))


def test_unigram_perplexity_by_hand() -> None:
    # Counts [2, 1, 0] over 3 ids: smoothed p = [3/6, 2/6, 1/6]; held-out [0, 2] -> sqrt(12).
    train = np.array([0, 0, 1], dtype=np.uint16)
    assert unigram_perplexity(train, np.array([0, 2]), 3) == pytest.approx(math.sqrt(12))
    assert unigram_perplexity(np.array([], dtype=np.uint16), np.array([1, 2]), 5) == (
        pytest.approx(5.0))  # no training data: uniform
    with pytest.raises(ValueError, match="held-out token ids"):
        unigram_perplexity(train, np.array([3]), 3)


# --- Jensen-Shannon divergence ------------------------------------------------------------------

counts_lists = st.lists(st.integers(0, 1000), min_size=2, max_size=12)


@st.composite
def count_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Two count vectors of one length, each with at least one non-zero count."""
    p = draw(counts_lists.filter(any))
    q = draw(st.lists(st.integers(0, 1000), min_size=len(p), max_size=len(p)).filter(any))
    return np.array(p, dtype=np.float64), np.array(q, dtype=np.float64)


@given(count_pairs())
def test_js_is_symmetric_and_bounded(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pair
    value = js_divergence(p, q)
    assert 0.0 <= value <= 1.0
    assert value == js_divergence(q, p)


@given(count_pairs(), st.integers(1, 7))
def test_js_is_zero_exactly_for_equal_distributions(pair: tuple[np.ndarray, np.ndarray],
                                                    scale: int) -> None:
    p, q = pair
    assert js_divergence(p, p * scale) == 0.0  # proportional counts: the same distribution
    gap = np.abs(p / p.sum() - q / q.sum()).max()
    if gap >= 1e-3:  # a clear difference is never rounded away to 0
        assert js_divergence(p, q) > 0.0


@given(count_pairs())
def test_js_of_disjoint_supports_is_one_bit(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pair
    disjoint_p = np.concatenate([p, np.zeros_like(q)])
    disjoint_q = np.concatenate([np.zeros_like(p), q])
    assert js_divergence(disjoint_p, disjoint_q) == pytest.approx(1.0, abs=1e-12)


def test_js_known_value() -> None:
    # m = [3/4, 1/4]: KL(p||m) = log2(4/3), KL(q||m) = (log2(2/3) + 1) / 2.
    expected = 0.5 * (math.log2(4 / 3) + 0.5 * (math.log2(2 / 3) + 1))
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(expected)
    with pytest.raises(ValueError):
        js_divergence(np.array([0.0, 0.0]), np.array([1.0, 0.0]))


def test_pairwise_js_is_a_symmetric_matrix_per_layer() -> None:
    a = np.array([[0.5, 0.5], [1.0, 0.0]])  # [L, E]
    b = np.array([[0.5, 0.5], [0.0, 1.0]])
    js = pairwise_js([a, b, a])  # [D, D, L]
    assert js.shape == (3, 3, 2)
    assert np.allclose(js[0, 1], [0.0, 1.0]) and np.allclose(js[0, 2], 0.0)
    assert np.array_equal(js, js.transpose(1, 0, 2)) and np.all(js[[0, 1, 2], [0, 1, 2]] == 0)
    assert np.allclose(mean_over_pairs(js), [0.0, 2 / 3])


# --- Routing counts -----------------------------------------------------------------------------


def test_routing_counts_cover_every_tokens_top_k(model: MoEForCausalLM, data_dir: Path) -> None:
    tokens = np.load(data_dir / "high.heldout.npy")
    seen: list[int] = []
    for block in model.moe_blocks():  # an observer already present keeps working
        block.observer = lambda layer, ids, weights: seen.append(layer)
    with RoutingCounter(model) as counter:
        heldout_perplexity(model, tokens, SEQ_LEN, max_tokens=3 * SEQ_LEN, batch_size=2)
    assert counter.moe_layers == (1, 2)  # mlp_only_layers=[0]
    counts = counter.counts  # [L, E]
    assert counts.shape == (2, 6)
    assert np.all(counts.sum(axis=1) == 3 * SEQ_LEN * 2)  # windows x tokens x top-k
    assert len(seen) == 2 * 2  # two batches through two MoE blocks
    assert all(callable(block.observer) for block in model.moe_blocks())  # restored on exit
    for block in model.moe_blocks():
        block.observer = None


# --- PNG heat map -------------------------------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    """`(width, height, raw scanline bytes)` of an 8-bit RGB PNG, with every chunk CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, raw


def test_png_round_trips_an_image() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    width, height, raw = _decode_png(encode_png(rgb))
    assert (width, height) == (7, 5)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * 3)
    assert np.all(rows[:, 0] == 0)  # filter type None on every row
    assert np.array_equal(rows[:, 1:].reshape(5, 7, 3), rgb)
    with pytest.raises(ValueError):
        encode_png(rgb.astype(np.float32))


def test_heatmap_layout_and_colours() -> None:
    layout = HeatmapLayout(cell_width_px=3, cell_height_px=4, gap_px=2, bar_height_px=5)
    shares = [np.full((2, 6), 1 / 6), np.eye(2, 6)]  # [L, E] per panel
    image = routing_heatmap(shares, layout)
    assert image.shape == (2 + 2 * 4 + 2 + 5 + 2, 2 + 6 * 3 + 2 + 6 * 3 + 2, 3)
    assert np.all(image[0] == 255) and np.all(image[:12, 20:22] == 255)  # margin, gap
    top, low = colour_ramp(np.array(1.0)), colour_ramp(np.array(0.0))
    assert np.array_equal(image[2, 22], top) and np.array_equal(image[2, 25], low)  # panel 2
    assert np.array_equal(image[13, 2], low) and np.array_equal(image[13, -3], top)  # the bar
    rgb_bytes = _decode_png(encode_png(image))[2]
    assert len(rgb_bytes) == image.shape[0] * (1 + image.shape[1] * 3)


# --- End to end ---------------------------------------------------------------------------------


def test_samples_are_greedy_continuations(model: MoEForCausalLM, checkpoint: Path) -> None:
    from moe_core import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    samples = sample_generations(model, tokenizer, {"story": "once upon a time"}, 5)
    free = model.generate([[EOS, 3, 4, 5, 6]], max_new_tokens=5, eos_token_id=[])
    sample = samples["story"]
    assert sample.num_new_tokens <= 5 and sample.finish_reason in ("eos", "length")
    expected = free[0, : sample.num_new_tokens].tolist()
    assert sample.completion == tokenizer.decode(expected, skip_special_tokens=True)


def test_evaluate_writes_the_report_and_the_heat_map(checkpoint: Path, data_dir: Path,
                                                     tmp_path: Path) -> None:
    config = EvaluationConfig(seq_len=SEQ_LEN, max_tokens_per_domain=4 * SEQ_LEN, batch_size=3,
                              max_new_tokens=4)
    lines: list[str] = []
    report = evaluate_tiny_model(checkpoint, data_dir, tmp_path, config=config,
                                 prompts={"story": "once upon"}, progress=lines.append)
    assert json.loads((tmp_path / "evaluation.json").read_text()) == report
    assert report["domains"] == list(DOMAINS) and len(lines) == len(DOMAINS) + 3
    for figures in report["per_domain"].values():
        assert figures["tokens"] == 4 * SEQ_LEN
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss_nats"]))
        assert figures["unigram_perplexity"] > 1.0
    routing = report["routing"]
    for counts in routing["counts"].values():
        assert np.all(np.sum(counts, axis=1) == 4 * SEQ_LEN * routing["top_k"])
    js = np.array(routing["js_matrix"])  # [D, D]
    assert np.allclose(js, js.T) and np.all(np.diag(js) == 0)
    assert js[0, 1] > 0  # disjoint token ranges are routed differently even by random weights
    assert routing["mean_js"] == pytest.approx(js[np.triu_indices(3, 1)].mean())
    width, height, raw = _decode_png((tmp_path / "routing.png").read_bytes())
    assert (height, width) == HeatmapLayout().image_size(3, 2, 6)
    assert len(raw) == height * (1 + 3 * width)
    assert set(report["samples"]["story"]) == {"prompt", "completion", "num_new_tokens",
                                               "finish_reason"}
