"""The tokenizer of a tiny CPU model, built from the words of its task (the environment's ``Vocabulary``).

Only the characters the task's text uses are in it: a ~60-token action space, so a random
policy names a right one-word answer often enough for GRPO groups to see any reward at all.

    tokenizer = task_tokenizer(Vocabulary(words=("red", "blue"), text="Name the colour."))
    tokenizer = task_tokenizer(None)     # an environment without a vocabulary: every byte, any text encodes
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from mmref.client.environment import Vocabulary
from mmref.renderers.render.kimi import DEFAULT_SYSTEM as KIMI_SYSTEM
from mmref.renderers.tokenizer import KIMI_SPECIAL_TOKENS, KIMI_VIDEO_TOKEN, tiny_tokenizer

ROLE_WORDS = ("system", "user", "assistant")
RL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Kimi K2.5's chat scaffold: its special tokens, and the words and system text it writes as text.
KIMI_RL_SPECIALS = (*KIMI_SPECIAL_TOKENS, KIMI_VIDEO_TOKEN)
KIMI_WORDS, KIMI_TEXT = ("image",), KIMI_SYSTEM + "<think></think>"


def task_tokenizer(vocabulary: Vocabulary | None, family: str = "qwen2-vl") -> PreTrainedTokenizerFast:
    """Answer words, then the chat roles, then prompt words as single tokens; the alphabet of all the text.

    ``family``: kimi-k2.5 gets Kimi's special tokens and the text its template writes, Qwen families Qwen's.
    """
    kimi = family == "kimi-k2.5"
    specials = KIMI_RL_SPECIALS if kimi else RL_SPECIALS
    roles = ROLE_WORDS + (KIMI_WORDS if kimi else ())
    if vocabulary is None:
        return tiny_tokenizer(roles, specials=specials)
    words = tuple(dict.fromkeys(vocabulary.words + roles + vocabulary.prompt_words))
    text = vocabulary.text + "".join(words) + " \n" + (KIMI_TEXT if kimi else "")
    return tiny_tokenizer(words, specials=specials, alphabet="".join(sorted(set(text))))
