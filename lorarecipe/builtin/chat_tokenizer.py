"""Offline chat tokenizers for the LLM text encoders of FLUX.2 (Mistral 3, Qwen3), built in code.

Input: the same word list as the CLIP/T5 tokenizers (``tokenizer.DEFAULT_WORDS``) and a chat template
name. Output: a byte-level BPE tokenizer (transformers' ``Qwen2Tokenizer``, backed by ``tokenizers``)
with that chat template: ``Flux2KleinPipeline`` renders ``apply_chat_template(…, enable_thinking=False)``
and tokenizes the text; ``Flux2Pipeline`` calls ``apply_chat_template`` with content lists and
``tokenize=True``. No file, no network.

Vocabulary: the 256 GPT-2 byte characters, then for every word the chain ``Ġw``, ``Ġwo``, ``Ġwor``…
(``Ġ`` is the byte-level space), built only by merges whose left side starts with ``Ġ``: no other
merge exists, so a listed word after a space is always one token; anything else falls back to bytes.

Substitute, said plainly: the real FLUX.2 dev tokenizer is ``PixtralProcessor`` (text + images), and
transformers 5 refuses to build it without torchvision, which is not installed (nor a lorarecipe
dependency). For text prompts ``Flux2Pipeline`` only calls ``apply_chat_template``, which the tokenizer
alone provides, with a Mistral-style template (``[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .tokenizer import DEFAULT_WORDS, _bytes_to_unicode

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

__all__ = ["build_chat_tokenizer", "byte_level_vocab"]

_SPACE = "\u0120"  # 'Ġ': GPT-2's byte-level space

_QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}{%- else %}{{ '[INST]' }}{%- endif %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'text' %}{{ item['text'] }}{%- else %}{{ '[IMG]' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{ '[/SYSTEM_PROMPT]' }}{%- else %}{{ '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
_SPECIALS = {
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "mistral": ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"),
}


def byte_level_vocab(words: tuple[str, ...] = DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Words -> (vocab, merges) of a byte-level BPE in which ``Ġword`` is one token (module docstring)."""
    vocab = {char: index for index, char in enumerate(_bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = _SPACE
        for char in word:
            longer = piece + char
            if longer not in vocab:
                vocab[longer] = len(vocab)
                merges.append((piece, char))
            piece = longer
    return vocab, merges


def build_chat_tokenizer(template: Literal["qwen3", "mistral"], max_length: int = 512) -> Qwen2Tokenizer:
    """A chat tokenizer for Qwen3 (Klein) or Mistral 3 (FLUX.2 dev) prompts, built offline."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_vocab()
    if template == "qwen3":
        tokens = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
        chat = _QWEN3_TEMPLATE
    else:
        tokens = {"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"}
        chat = _MISTRAL_TEMPLATE
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, model_max_length=max_length, chat_template=chat, **tokens
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIALS[template])})
    return tokenizer
