"""Prompts with subject markers: "a man <|image|> and a woman <|image|> on a beach" (METHOD.md §1).

A marker follows each subject noun. It is removed from the token ids and the token just before it (the last
BPE token of the noun) is flagged; the subject's image embedding is fused there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IMAGE_TOKEN = "<|image|>"
DEFAULT_MAX_SUBJECTS = 4


def count_markers(prompt: str) -> int:
    return prompt.count(IMAGE_TOKEN)


def strip_markers(prompt: str) -> str:
    """The prompt as plain text (for CLIP scoring and captions): markers removed, spaces collapsed."""
    return re.sub(r"\s+", " ", prompt.replace(IMAGE_TOKEN, " ")).strip()


def insert_markers(caption: str, noun_ends: list[int]) -> str:
    """Put a marker after each noun phrase, given the character offsets where they end (FastComposer's `end`)."""
    out, previous = [], 0
    for end in sorted(noun_ends):
        if not 0 < end <= len(caption):
            raise ValueError(f"noun end offset {end} outside caption of length {len(caption)}")
        out.append(caption[previous:end])
        out.append(" " + IMAGE_TOKEN)
        previous = end
    out.append(caption[previous:])
    return "".join(out)


def ensure_image_token(tokenizer) -> int:
    """Add the marker to the tokenizer if it is missing; return its id. (Looks in the added tokens, not
    `get_vocab()`, which rebuilds the whole 49k-entry vocabulary dict: ~40 ms on every prompt.)"""
    if IMAGE_TOKEN not in tokenizer.get_added_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


@dataclass
class TokenizedPrompt:
    input_ids: torch.Tensor  # [L] clean ids (markers removed), padded to the tokenizer's max length
    image_token_mask: torch.Tensor  # [L] bool, True at each subject noun's last token
    num_subjects: int


def tokenize_with_markers(tokenizer, prompt: str, max_subjects: int = DEFAULT_MAX_SUBJECTS) -> TokenizedPrompt:
    image_token_id = ensure_image_token(tokenizer)
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    clean: list[int] = []
    flagged: list[int] = []
    for token in ids:
        if token == image_token_id:
            if len(clean) <= 1:  # only BOS before it
                raise ValueError(f"a {IMAGE_TOKEN} marker must follow a subject noun: {prompt!r}")
            if flagged and flagged[-1] == len(clean) - 1:
                raise ValueError(f"two {IMAGE_TOKEN} markers follow the same word: {prompt!r}")
            flagged.append(len(clean) - 1)
        else:
            clean.append(token)
    if len(flagged) > max_subjects:
        raise ValueError(
            f"prompt has {len(flagged)} {IMAGE_TOKEN} markers; at most {max_subjects} subjects are supported"
        )
    if len(clean) > max_length:
        if flagged and flagged[-1] >= max_length - 1:
            raise ValueError(f"prompt is too long: a subject marker falls beyond token {max_length - 1}")
        clean = clean[: max_length - 1] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor(clean + [pad] * (max_length - len(clean)), dtype=torch.long)
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[flagged] = True
    return TokenizedPrompt(input_ids=input_ids, image_token_mask=mask, num_subjects=len(flagged))
