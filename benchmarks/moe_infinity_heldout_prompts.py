"""Held-out prompts of the tiny model's seven domains, mixed, for `moe-infinity trace`.

    .venv/bin/python benchmarks/moe_infinity_heldout_prompts.py --corpus ../shared/corpus \
        --out .cache/moe-infinity/heldout.jsonl
    .venv/bin/moe-infinity trace --input .cache/moe-infinity/heldout.jsonl \
        --output .cache/moe-infinity/heldout.bin
    .venv/bin/moe-infinity simulate .cache/moe-infinity/heldout.bin \
        --plot docs/moe-infinity/hit-rate.png

The documents come from the held-out split of the tiny model's training recipe
(`moe_core.tiny_training.corpus.read_corpus`, the split its evaluation uses: the last 3% of each
book, the GSM8K test split, 1 in 33 standard-library files), so no prompt was trained on. Each
prompt is a stretch of one document (from a seeded random paragraph for prose, the question as a
chat turn for math, from a random function or class for code; small domains take several
prompts from one document), cut at a word boundary. Prompts of all domains are shuffled together
(seeded), so consecutive requests change domain as a server's would. The corpus is not in the
repository: this script reads it from `--corpus`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from moe_core.tiny_training.corpus import DOMAINS, read_corpus

_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def _cut(text: str, max_chars: int) -> str:
    """`text` up to `max_chars`, ending at a word boundary."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0]


def _prompt(domain: str, doc: str, rng: random.Random, max_chars: int) -> dict[str, object]:
    if domain == "math":
        match = _USER.search(doc)
        question = match.group(1).strip() if match else doc
        return {"messages": [{"role": "user", "content": question}]}
    if domain == "code":
        starts = [0] + [m.start() + 1 for m in re.finditer(r"\n(?:def|class) ", doc)]
        return {"prompt": _cut(doc[rng.choice(starts):].lstrip(), max_chars)}
    paragraphs = [p for p in doc.split("\n\n") if len(p.strip()) > 40]
    start = rng.randrange(len(paragraphs)) if paragraphs else 0
    text = "\n\n".join(paragraphs[start:]) if paragraphs else doc
    return {"prompt": _cut(text.strip(), max_chars)}


def main() -> None:
    """Write the prompts file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    parser.add_argument("--out", type=Path, default=Path(".cache/moe-infinity/heldout.jsonl"))
    parser.add_argument("--per-domain", type=int, default=40)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    corpus = read_corpus(args.corpus)
    prompts = []
    for domain in DOMAINS:
        docs = [d for d in corpus[domain].heldout if len(d.strip()) >= 80]  # no empty files
        rng.shuffle(docs)
        # Small domains (plays has 10 held-out documents) give several prompts per document,
        # each from another random paragraph or function.
        picks = [docs[i % len(docs)] for i in range(args.per_domain)] if docs else []
        for i, doc in enumerate(picks):
            prompts.append({"id": f"{domain}-{i}", "domain": domain,
                            **_prompt(domain, doc, rng, args.max_chars)})
    rng.shuffle(prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts),
                        encoding="utf-8")
    counts = {d: sum(p["domain"] == d for p in prompts) for d in DOMAINS}
    print(f"{len(prompts)} prompts -> {args.out} ({counts})")


if __name__ == "__main__":
    main()
