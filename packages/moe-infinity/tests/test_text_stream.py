"""Incremental detokenisation: whatever the tokens, `TextStream` releases exactly what decoding
the whole output at every token releases (the pieces, where it stops, what a flush gives), while
each token decodes only a bounded window."""

from __future__ import annotations

from collections.abc import Callable

import moe_core
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_infinity.serving.text_stream import TextDecoder, TextStream

_TOKENIZER = moe_core.load_tokenizer(moe_core.tiny_model_path())
_VOCAB = len(_TOKENIZER)
_BYTE_IDS = sorted(_TOKENIZER.convert_tokens_to_ids(  # one token per byte (ByteLevel)
    sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())))
_SPECIAL_IDS = list(_TOKENIZER.all_special_ids)


def _tiny(ids: list[int]) -> str:
    """The embedded model's detokeniser, as the server calls it (`ServingModel.decode`)."""
    return str(_TOKENIZER.decode(ids, skip_special_tokens=True))


_PIECES = ["", "▁", "▁▁", "a", "▁a", "b", "▁b", "c", ",", "▁,"]  # id 0: a special token


def _sentencepiece(ids: list[int]) -> str:
    """A SentencePiece-style detokeniser: `▁` is a space and the text's first one is dropped
    (so a token's text depends on whether something precedes it)."""
    text = "".join(_PIECES[i] for i in ids).replace("▁", " ")
    return text[1:] if text.startswith(" ") else text


def _cleanup(ids: list[int]) -> str:
    """A detokeniser that rewrites text across tokens (`clean_up_tokenization_spaces`)."""
    return "".join(_PIECES[i] for i in ids).replace("▁", " ").replace(" ,", ",")


def _whole_decode_stream(decode: TextDecoder, stop: list[str], ids: list[int],
                         at_end: str) -> list[tuple[str, bool]]:
    """The reference: every token decodes the whole output. `(piece, stopped)` of each push
    until a stop string, then the flush's piece (`at_end`: `flush` or `none`)."""
    stops = [s for s in stop if s]
    released, out = 0, []

    def release(text: str, end: int) -> str:
        nonlocal released
        piece = text[released:end] if end > released else ""
        released = max(released, end)
        return piece

    for i in range(1, len(ids) + 1):
        text = decode(ids[:i])
        reach = max(0, released - max((len(s) for s in stops), default=0))
        found = [j for s in stops if (j := text.find(s, reach)) >= 0]
        if found:
            out.append((release(text, min(found)), True))
            return out
        held = 0
        if text.endswith("\ufffd"):
            held = len(text) - len(text.rstrip("\ufffd"))
        else:
            for s in stops:
                sizes = [n for n in range(min(len(s) - 1, len(text)), 0, -1)
                         if text.endswith(s[:n])]
                held = max([held, *sizes[:1]])
        out.append((release(text, len(text) - held), False))
    if at_end == "flush" and ids:
        text = decode(ids)
        out.append((release(text, len(text)), False))
    return out


def _stream(decode: TextDecoder, stop: list[str], ids: list[int], at_end: str
            ) -> list[tuple[str, bool]]:
    stream = TextStream(decode, stop)
    out = []
    for token in ids:
        out.append((stream.push(token), stream.stopped))
        if stream.stopped:
            return out
    if at_end == "flush" and ids:
        out.append((stream.flush(), False))
    return out


def _tiny_ids() -> st.SearchStrategy[list[int]]:
    """Token ids in runs: any token, single bytes (half characters, invalid UTF-8, whole
    multi-byte characters across tokens), special tokens, and real text's tokens (accents,
    CJK, emoji)."""
    run = st.one_of(
        st.lists(st.integers(0, _VOCAB - 1), max_size=4),
        st.lists(st.sampled_from(_BYTE_IDS), max_size=5),
        st.lists(st.sampled_from(_SPECIAL_IDS), max_size=2),
        st.text(alphabet="abc ,.\n\tàéü€中文😀", max_size=10).map(
            lambda text: list(_TOKENIZER.encode(text))))
    return st.lists(run, max_size=12).map(lambda runs: [t for r in runs for t in r])


@settings(max_examples=300, deadline=None)
@given(_tiny_ids())
def test_the_released_text_is_the_whole_decode_on_the_tiny_tokenizer(ids: list[int]) -> None:
    stream = TextStream(_tiny)
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert text == _tiny(ids)


@settings(max_examples=300, deadline=None)
@given(_tiny_ids(), st.lists(st.text(alphabet="abc ,.\n€😀", min_size=1, max_size=4),
                             max_size=3), st.sampled_from(["flush", "none"]))
def test_each_piece_and_stop_is_the_whole_decodes_on_the_tiny_tokenizer(
        ids: list[int], stop: list[str], at_end: str) -> None:
    assert _stream(_tiny, stop, ids, at_end) == _whole_decode_stream(_tiny, stop, ids, at_end)


@pytest.mark.parametrize("decode", [_sentencepiece, _cleanup], ids=["sentencepiece", "cleanup"])
@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(_PIECES) - 1), max_size=30),
       stop=st.lists(st.text(alphabet="ab ,", min_size=1, max_size=3), max_size=2))
def test_decoders_that_look_across_tokens_give_the_whole_decodes_pieces(
        decode: Callable[[list[int]], str], ids: list[int], stop: list[str]) -> None:
    """A first token decoded apart (a lone `▁`, a special token before a `▁a`), and text
    rewritten across tokens (` ,`), are released as the whole decode releases them."""
    assert _stream(decode, stop, ids, "flush") == _whole_decode_stream(decode, stop, ids,
                                                                       "flush")


def test_each_token_decodes_a_bounded_window() -> None:
    """A long output (multi-byte characters included) is decoded a few tokens at a time: the
    cost per token does not grow with the output."""
    ids = list(_TOKENIZER.encode("Il était une fois un renard — 狐狸 🦊 — who said: 'hé!'\n" * 24))
    assert len(ids) > 500
    windows: list[int] = []

    def counting(window: list[int]) -> str:
        windows.append(len(window))
        return _tiny(window)

    stream = TextStream(counting, stop=["THE END"])
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert text == _tiny(ids)
    assert max(windows) <= 6 and len(windows) <= 2 * len(ids) + 1
