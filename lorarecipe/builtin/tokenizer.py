"""Offline CLIP and T5 tokenizers built from an in-memory vocabulary (no Hub, no files).

Input: a tuple of words. Output: a ``transformers.CLIPTokenizer`` whose vocabulary is the 256 GPT-2
byte characters, the same 256 with ``</w>``, one token per *suffix* of every word (so each word is one
token), then ``<|startoftext|>`` and ``<|endoftext|>``.

Why suffixes: CLIP's BPE marks only the *end* of a word (``</w>``). Every merge here has a right-hand
token ending in ``</w>``, so a merge can only ever fire at the end of a word and there is exactly one
candidate pair at each step: a listed word always becomes a single token whatever the merge ranks, and
an unknown word falls back to suffix pieces and single bytes (never to ``<|endoftext|>``).

Trap (transformers 5): ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores both files
and builds a 2-entry vocabulary; merges must be passed as tuples, not ``"a b"`` strings.

The T5 tokenizer (FLUX.1's second encoder) is a Unigram model over ``<pad>``, ``</s>``, ``<unk>``, ``▁``
and ``▁word`` for the same words, so no sentencepiece model file is needed; unknown words become
``<unk>``.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_WORDS",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
_EOW = "</w>"

#: Words a demo prompt is likely to use. Changing this list changes the built-in bytes
#: (bump ``BUILTIN_VERSION`` in catalog.py).
_WORDS_TEXT = """
    # subjects
    photo picture painting drawing sketch portrait landscape illustration cat dog bird fish horse fox
    owl rabbit dragon robot person man woman child girl boy astronaut knight wizard castle house city
    street forest tree flower garden mountain river lake ocean sea beach island sky cloud sun moon star
    stars space planet car ship boat train chair table room kitchen window door apple cake coffee cup
    book
    # styles and qualities
    style detail detailed highly pixel art anime cartoon toy watercolor oil digital realistic
    photorealistic cinematic studio lighting light dark bright soft sharp focus blurry vintage retro
    modern minimal abstract surreal fantasy quality best masterpiece low high resolution beautiful cute
    small tiny big large old new happy sad
    # colours and materials
    red green blue yellow orange purple pink black white gray golden silver wooden glass metal stone
    # glue words and negative-prompt words
    a an the of in on at with and or by for from to under over near wearing holding sitting standing
    running flying night day morning evening sunset sunrise winter summer autumn spring rain snow fog
    ugly bad worst deformed text watermark lowres
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(
    word for line in _WORDS_TEXT.splitlines() if not line.lstrip().startswith("#") for word in line.split()
)


@cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character table, as 256 characters in byte order."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def clip_vocab(words: tuple[str, ...] = DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Words -> (vocab, merges) for a CLIP BPE in which every word is one token.

    Pure Python and deterministic: ids follow the order of ``words``. Words must be lowercase ASCII
    letters (what CLIP's pre-tokenizer keeps together as one piece).
    """
    for word in words:
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"tokenizer words must be lowercase ASCII letters, got {word!r}")
    base = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in (*base, *(c + _EOW for c in base)):
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        # right-to-left chain: "t</w>" -> "at</w>" -> "cat</w>"
        suffix = word[-1] + _EOW
        for i in range(len(word) - 2, -1, -1):
            merged = word[i] + suffix
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((word[i], suffix))
            suffix = merged
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS) -> CLIPTokenizer:
    """Words -> a working ``CLIPTokenizer`` (model_max_length 77), built without touching disk or network."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


def build_t5_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS) -> T5Tokenizer:
    """Words -> a working ``T5Tokenizer`` (Unigram, one token per word, model_max_length 512), offline."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
