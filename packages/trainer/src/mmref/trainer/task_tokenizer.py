"""The tokenizer of a tiny CPU model, built from the words of its task (the environment's ``Vocabulary``).

Only the characters the task's text uses are in it: a ~60-token action space, so a random
policy names a right one-word answer often enough for GRPO groups to see any reward at all.

    tokenizer = task_tokenizer(Vocabulary(words=("red", "blue"), text="Name the colour."))
    tokenizer = task_tokenizer(None)     # an environment without a vocabulary: every byte, any text encodes
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from mmref.client.environment import Vocabulary
from mmref.renderers.tokenizer import tiny_tokenizer

ROLE_WORDS = ("system", "user", "assistant")
RL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def task_tokenizer(vocabulary: Vocabulary | None) -> PreTrainedTokenizerFast:
    """Answer words, then the chat roles, then prompt words as single tokens; the alphabet of all the text."""
    if vocabulary is None:
        return tiny_tokenizer(ROLE_WORDS, specials=RL_SPECIALS)
    words = tuple(dict.fromkeys(vocabulary.words + ROLE_WORDS + vocabulary.prompt_words))
    text = vocabulary.text + "".join(words) + " \n"
    return tiny_tokenizer(words, specials=RL_SPECIALS, alphabet="".join(sorted(set(text))))
