"""The tiny model's training text: seven domains, each split into train and held-out documents.

Domains: English stories, math word problems (GSM8K, as chat turns), plays (Shakespeare),
German, French and Spanish books, and Python source from the running interpreter's standard
library. The GSM8K test split is held out whole; every other domain holds out the last
`heldout_share` of each file's documents (code: a deterministic 1-in-`1/heldout_share` share of
files). Long texts are cut into documents of about `doc_chars` characters at paragraph breaks.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from moe_core.errors import InputFileError

__all__ = ["DOMAINS", "DomainText", "read_corpus"]

DOMAINS: tuple[str, ...] = ("stories", "math", "plays", "de", "fr", "es", "code")

_TEXT_DIRS = {"stories": "stories", "plays": "plays", "de": "other-languages/de",
              "fr": "other-languages/fr", "es": "other-languages/es"}
# Standard-library folders that are not representative code (tests, demos, vendored data).
_SKIP_CODE = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "turtledemo", "ensurepip", "__pycache__", "config-3"}
CHAT_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"


@dataclass(frozen=True)
class DomainText:
    """One domain's documents.

    Attributes:
        name: Domain name (one of `DOMAINS`).
        train: Training documents.
        heldout: Evaluation documents, never trained on (tokenizer included).
    """

    name: str
    train: list[str]
    heldout: list[str]

    @property
    def train_chars(self) -> int:
        """Characters of training text."""
        return sum(len(d) for d in self.train)


def _documents(text: str, doc_chars: int) -> list[str]:
    """Cut `text` into documents of about `doc_chars` characters at blank lines."""
    docs, current, size = [], [], 0
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _split_files(paths: list[Path], max_chars: int, heldout_share: float,
                 doc_chars: int) -> tuple[list[str], list[str]]:
    """Documents of every file: the head of each (its share of `max_chars`) for training, the
    tail of each for evaluation."""
    sizes = {p: p.stat().st_size for p in paths}
    total = sum(sizes.values())
    train: list[str] = []
    heldout: list[str] = []
    for path in paths:
        docs = _documents(path.read_text(encoding="utf-8"), doc_chars)
        n_heldout = max(1, round(len(docs) * heldout_share))
        heldout.extend(docs[-n_heldout:])
        budget = max_chars * sizes[path] / total
        used = 0
        for doc in docs[:-n_heldout]:
            if used >= budget:
                break
            train.append(doc)
            used += len(doc)
    return train, heldout


def _gsm8k(path: Path, limit: int | None = None) -> list[str]:
    """GSM8K problems as one user turn and one assistant turn each."""
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        item = json.loads(line)
        docs.append(CHAT_TURN.format(role="user", content=item["question"])
                    + CHAT_TURN.format(role="assistant", content=item["answer"]))
    return docs


def _code_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = set(path.relative_to(stdlib).parts[:-1])
        if parts & _SKIP_CODE or any(p.startswith("config-") for p in parts):
            continue
        files.append(path)
    return files


def _code(stdlib: Path, max_chars: int, heldout_share: float) -> tuple[list[str], list[str]]:
    """Standard-library modules: a fixed hash-chosen share of files held out, the rest trained on
    (in path order, up to `max_chars`)."""
    every = max(2, round(1 / heldout_share))
    train: list[str] = []
    heldout: list[str] = []
    used = 0
    for path in _code_files(stdlib):
        text = path.read_text(encoding="utf-8", errors="replace")
        name = str(path.relative_to(stdlib))
        if zlib.crc32(name.encode()) % every == 0:
            heldout.append(text)
        elif used < max_chars:
            train.append(text)
            used += len(text)
    if not heldout and len(train) > 1:  # a small tree where no path hashed into the held-out share
        heldout.append(train.pop())
    return train, heldout


def read_corpus(corpus_dir: str | Path, *, code_dir: str | Path | None = None,
                max_chars_per_domain: int = 6_000_000, heldout_share: float = 0.03,
                doc_chars: int = 3000) -> dict[str, DomainText]:
    """Read every domain of the corpus (see the module docstring).

    Args:
        corpus_dir: The `corpus/` folder (see its MANIFEST.md).
        code_dir: Python standard library to use as the code domain (default: this
            interpreter's, from `sysconfig`).
        max_chars_per_domain: Cap on each domain's training text.
        heldout_share: Share of each file's documents kept for evaluation.
        doc_chars: Target document length for long texts.

    Raises:
        InputFileError: a domain's folder or file is missing.
    """
    root = Path(corpus_dir)
    out: dict[str, DomainText] = {}
    for domain, sub in _TEXT_DIRS.items():
        paths = sorted((root / sub).rglob("*.txt"))
        if not paths:
            raise InputFileError(f"{root / sub}: no .txt files for domain {domain!r}")
        train, heldout = _split_files(paths, max_chars_per_domain, heldout_share, doc_chars)
        out[domain] = DomainText(domain, train, heldout)
    math_train = _gsm8k(root / "math" / "gsm8k_train.jsonl")
    math_heldout = _gsm8k(root / "math" / "gsm8k_test.jsonl")  # the official test split, whole
    out["math"] = DomainText("math", math_train, math_heldout)
    stdlib = Path(code_dir) if code_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    code_train, code_heldout = _code(stdlib, max_chars_per_domain, heldout_share)
    out["code"] = DomainText("code", code_train, code_heldout)
    return {d: out[d] for d in DOMAINS}
