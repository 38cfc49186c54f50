"""The tiny model's recipe at toy scale on CPU: corpus split, tokenizer, token arrays, sampler,
a few seeded training steps, and a checkpoint both transformers and we load identically."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moe_core import load_model, load_tokenizer, render_chat
from moe_core.cli import app
from moe_core.tiny_training.corpus import DOMAINS, read_corpus
from moe_core.tiny_training.dataset import TokenData, WindowSampler, write_token_data
from moe_core.tiny_training.tokenizer_training import train_tokenizer
from moe_core.tiny_training.trainer import TinyModelConfig, TrainConfig, train_tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

TOY_MODEL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=16,
                            max_position_embeddings=64)
TOY_TRAIN = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, log_every=1)


def _write_corpus(root: Path) -> tuple[Path, Path]:
    words = {"stories": "the fox ran home", "plays": "ROMEO: speak again",
             "de": "der Hund läuft", "fr": "le chien court", "es": "el perro corre"}
    folders = {"stories": "stories", "plays": "plays", "de": "other-languages/de",
               "fr": "other-languages/fr", "es": "other-languages/es"}
    for domain, sub in folders.items():
        (root / sub).mkdir(parents=True)
        paragraphs = [f"{words[domain]} {i}." for i in range(200)]
        (root / sub / f"{domain}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (root / "math").mkdir()
    for split, first in (("train", 0), ("test", 100)):
        rows = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}"})
                for i in range(first, first + (40 if split == "train" else 5))]
        (root / "math" / f"gsm8k_{split}.jsonl").write_text("\n".join(rows), encoding="utf-8")
    stdlib = root / "stdlib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    for i in range(40):
        (stdlib / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (stdlib / "test" / "test_skip.py").write_text("SKIPPED = True\n")
    return root, stdlib


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, stdlib = _write_corpus(tmp_path_factory.mktemp("corpus"))
    corpus = read_corpus(root, code_dir=stdlib, max_chars_per_domain=2000, doc_chars=100)
    out = tmp_path_factory.mktemp("data")
    tokenizer = train_tokenizer(corpus, out / "tokenizer", vocab_size=300)
    write_token_data(corpus, tokenizer, out)
    return out


def test_corpus_split_holds_out_without_overlap(tmp_path: Path) -> None:
    root, stdlib = _write_corpus(tmp_path)
    corpus = read_corpus(root, code_dir=stdlib, max_chars_per_domain=2000, doc_chars=100)
    assert list(corpus) == list(DOMAINS)
    for domain in corpus.values():
        assert domain.train and domain.heldout
        assert not set(domain.train) & set(domain.heldout), domain.name
    assert len(corpus["math"].heldout) == 5  # the GSM8K test split, whole
    assert "<|im_start|>user\nWhat is 0 + 1?<|im_end|>" in corpus["math"].train[0]
    assert not any("SKIPPED" in doc for doc in corpus["code"].train + corpus["code"].heldout)
    assert corpus["stories"].train_chars <= 2000 + 100  # the cap, give or take one document


def test_tokenizer_has_specials_and_chat_template(data: Path) -> None:
    tokenizer = load_tokenizer(data / "tokenizer")
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>", "<|im_start|>",
                                            "<|im_end|>"]) == [0, 1, 2, 3]
    ids = render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids[0] == 2 and tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    text = "der Hund läuft"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_token_arrays_and_sampler(data: Path) -> None:
    tokens = TokenData.open(data)
    assert tokens.domains == list(DOMAINS)
    stories = tokens.tokens("stories", "train")
    assert stories.dtype == np.uint16 and (stories == 0).sum() > 0  # EOS between documents
    first = WindowSampler(tokens, seq_len=8, batch_size=5, seed=3).batch()
    again = WindowSampler(tokens, seq_len=8, batch_size=5, seed=3).batch()
    other = WindowSampler(tokens, seq_len=8, batch_size=5, seed=4).batch()
    assert first.shape == (5, 9) and torch.equal(first, again) and not torch.equal(first, other)


def test_training_is_seeded_and_the_checkpoint_loads_everywhere(data: Path,
                                                                tmp_path: Path) -> None:
    log = train_tiny_model(data, tmp_path / "a", model_config=TOY_MODEL, train_config=TOY_TRAIN,
                           device="cpu", progress=lambda _: None)
    train_tiny_model(data, tmp_path / "b", model_config=TOY_MODEL, train_config=TOY_TRAIN,
                     device="cpu", progress=lambda _: None)
    assert log["steps_done"] == 3 and all(np.isfinite(c["lm_loss"]) for c in log["curve"])
    a = load_model(tmp_path / "a", dtype="float32")
    b = load_model(tmp_path / "b", dtype="float32")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        ours, theirs = a(ids), ref(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4
    assert json.loads((tmp_path / "a" / "generation_config.json").read_text())[
        "eos_token_id"] == [0, 3]


def test_learning_rate_schedule() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(99) == pytest.approx(1e-4, rel=0.01)
    lrs = [config.lr_at(s) for s in range(10, 100)]
    assert all(x >= y for x, y in itertools.pairwise(lrs))


def test_prepare_command(tmp_path: Path) -> None:
    root, _ = _write_corpus(tmp_path / "corpus")
    result = CliRunner().invoke(app, ["train-tiny", "prepare", "--corpus", str(root), "--out",
                                      str(tmp_path / "data"), "--vocab-size", "300",
                                      "--max-chars-per-domain", "20000"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == set(DOMAINS)


def test_prepare_reports_a_missing_corpus(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train-tiny", "prepare", "--corpus", str(tmp_path / "no"),
                                      "--out", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert "no .txt files for domain 'stories'" in result.stderr
