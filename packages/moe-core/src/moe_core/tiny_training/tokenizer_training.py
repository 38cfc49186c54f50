"""A byte-level BPE tokenizer (the GPT-2 scheme) trained on the corpus with the `tokenizers`
library, with special tokens and a ChatML-style chat template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from moe_core.tiny_training.corpus import DomainText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "EOS", "IM_END", "IM_START", "PAD", "train_tokenizer"]

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _sample(corpus: dict[str, DomainText], chars_per_domain: int) -> Iterator[str]:
    """Training documents, at most `chars_per_domain` of each domain, so that every language
    and the code get their own merges whatever their size."""
    for domain in corpus.values():
        used = 0
        for doc in domain.train:
            if used >= chars_per_domain:
                break
            used += len(doc)
            yield doc


def train_tokenizer(corpus: dict[str, DomainText], out_dir: str | Path, *,
                    vocab_size: int = 4096,
                    chars_per_domain: int = 2_000_000) -> PreTrainedTokenizerFast:
    """Train the tokenizer on the training documents only and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(_sample(corpus, chars_per_domain), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
