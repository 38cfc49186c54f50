"""Token arrays of each domain on disk, and the seeded sampler of training windows.

Layout of a data folder: `tokenizer/` (the trained tokenizer), `{domain}.train.npy` and
`{domain}.heldout.npy` (uint16 token ids, documents joined by the EOS id), `manifest.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_core.errors import InputFileError
from moe_core.tiny_training.corpus import DomainText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["TokenData", "WindowSampler", "write_token_data"]


def _tokenize(tokenizer: PreTrainedTokenizerFast, docs: list[str], eos_id: int) -> np.ndarray:
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for row in tokenizer(docs[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos_id)
    return np.asarray(ids, dtype=np.uint16)


def write_token_data(corpus: dict[str, DomainText], tokenizer: PreTrainedTokenizerFast,
                     out_dir: str | Path) -> dict[str, object]:
    """Tokenize every domain's train and held-out documents into `out_dir`; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise ValueError(f"vocabulary of {len(tokenizer)} does not fit uint16 token arrays")
    eos_id = tokenizer.eos_token_id
    counts: dict[str, dict[str, int]] = {}
    for name, domain in corpus.items():
        counts[name] = {}
        for split, docs in (("train", domain.train), ("heldout", domain.heldout)):
            tokens = _tokenize(tokenizer, docs, eos_id)
            np.save(out / f"{name}.{split}.npy", tokens)
            counts[name][split] = int(tokens.size)
            counts[name][f"{split}_chars"] = sum(len(d) for d in docs)
    manifest = {"domains": list(corpus), "vocab_size": len(tokenizer), "eos_token_id": eos_id,
                "pad_token_id": tokenizer.pad_token_id, "tokens": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class TokenData:
    """A data folder read back: token arrays per domain and split."""

    folder: Path
    manifest: dict[str, object]

    @classmethod
    def open(cls, folder: str | Path) -> TokenData:
        """Read `manifest.json` of a data folder written by `write_token_data`."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise InputFileError(f"{path}: not a token data folder (run the prepare step)")
        return cls(folder, json.loads(path.read_text()))

    @property
    def domains(self) -> list[str]:
        """Domain names in manifest order."""
        return list(self.manifest["domains"])  # type: ignore[call-overload]

    def tokens(self, domain: str, split: str) -> np.ndarray:
        """The uint16 token array of `domain`'s `split` (`train` or `heldout`)."""
        return np.load(self.folder / f"{domain}.{split}.npy", mmap_mode="r")


class WindowSampler:
    """Seeded batches of `seq_len + 1` token windows, each row from a domain drawn by weight.

    Domain weights are proportional to the square root of each domain's training tokens, so
    small domains (plays, German) are seen often enough to shape their own experts.
    """

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, seed: int) -> None:
        self.arrays = [np.asarray(data.tokens(d, "train")) for d in data.domains]
        sizes = np.array([a.size for a in self.arrays], dtype=np.float64)
        self.weights = np.sqrt(sizes) / np.sqrt(sizes).sum()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.batch()

    def batch(self) -> torch.Tensor:
        """`[batch_size, seq_len + 1]` int64 token windows."""
        domains = self.rng.choice(len(self.arrays), size=self.batch_size, p=self.weights)
        rows = []
        for d in domains:
            array = self.arrays[d]
            start = int(self.rng.integers(0, array.size - self.seq_len - 1))
            rows.append(array[start : start + self.seq_len + 1].astype(np.int64))
        return torch.from_numpy(np.stack(rows))
