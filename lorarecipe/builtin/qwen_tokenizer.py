"""An offline Qwen2 tokenizer (Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3 encoder) from in-memory words.

Input: words. Output: a ``transformers.Qwen2Tokenizer`` (byte-level BPE, the Qwen regex pre-tokenizer)
whose vocabulary is the 256 GPT-2 byte characters, every word with and without the leading-space
marker ``Ġ`` built by a chain of merges from its first character, and Qwen's chat special tokens.

Why this builds whole words: every merge of a ``Ġword`` chain has a left-hand token that starts with
``Ġ``, and ``Ġ`` only begins a word, so those merges can fire only at the start of a word, one
candidate at a time; they come first in the merge ranks, so a listed word after a space is one token.
Words without the marker (the first word of a text or after a newline) are chained the same way but
may split where another word's merge wins; that changes nothing but token counts.

The words of Qwen-Image's prompt template are in the vocabulary, so the template's system prefix is the
34 tokens the pipeline drops (``prompt_template_encode_start_idx``), as with the real tokenizer.
``CHAT_TEMPLATE`` is the part of Qwen3's chat template Z-Image's pipeline uses (user turns, the
generation prompt, ``enable_thinking``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tokenizer import DEFAULT_WORDS, _bytes_to_unicode

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

__all__ = ["CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "build_qwen_tokenizer"]

_SPACE = "\u0120"  # GPT-2's byte character for " "
#: the words of Qwen-Image's prompt template
_TEMPLATE_WORDS = (
    *("describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity"),
    *("text", "spatial", "relationships", "of", "objects", "and", "background"),
)
_LINE_STARTS = ("system", "user", "assistant", "Describe")

#: Qwen's end of text, chat turn markers and the vision markers Qwen2.5-VL's config names by id.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _chain(word: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Add the merges that build ``word`` left to right from its first character."""
    token = word[0]
    for char in word[1:]:
        joined = token + char
        if joined not in vocab:
            vocab[joined] = len(vocab)
            merges.append((token, char))
        token = joined


def build_qwen_tokenizer(
    words: tuple[str, ...] = DEFAULT_WORDS, chat_template: bool = False
) -> Qwen2Tokenizer:
    """Words -> a working ``Qwen2Tokenizer`` (see the module docstring), built without disk or network;
    ``chat_template``: attach :data:`CHAT_TEMPLATE` (Z-Image's pipeline applies it)."""
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(_bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    listed = tuple(dict.fromkeys((*_TEMPLATE_WORDS, *words)))
    for word in listed:
        _chain(_SPACE + word, vocab, merges)
    for word in (*_LINE_STARTS, *listed):
        _chain(word, vocab, merges)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
