"""Noun linking: find the person noun phrases in a caption and give each subject one (docs/preprocessing.md).

A person noun phrase is a caption word from PERSON_NOUNS (case-insensitive, whole words; "a young man"
ends after "man"). Its `noun_end` is the character offset just after that word — where training inserts
`<|image|>` (FastComposer's `end`). Assignment order: the k-th person noun in the caption goes to the k-th
subject from the left (subjects are sorted by face centre x). The counts must match; otherwise the image is
rejected with a reason, since a wrong link would teach the model the wrong identity for a word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERSON_NOUNS = frozenset(
    """
    person man woman boy girl child kid baby toddler infant teenager teen lady gentleman guy gal dude
    adult bride groom husband wife mother father mom dad son daughter brother sister grandmother grandfather
    grandma grandpa player athlete actor actress singer musician dancer model student teacher doctor nurse
    officer soldier policeman policewoman chef worker businessman businesswoman astronaut pilot cowboy
    surfer skier skateboarder snowboarder biker cyclist runner rider climber swimmer golfer boxer
    """.split()
)
# plural or collective nouns: they name several people with one word, which cannot be linked per subject
GROUP_NOUNS = frozenset(
    """
    people persons men women boys girls children kids babies ladies gentlemen guys adults couple family
    group crowd team friends players students twins
    """.split()
)

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


class LinkError(ValueError):
    """The caption's person nouns cannot be matched one-to-one with the detected subjects."""


@dataclass
class NounPhrase:
    noun: str  # the word as written in the caption
    end: int  # character offset just after it


def person_noun_phrases(caption: str) -> list[NounPhrase]:
    return [NounPhrase(m.group(0), m.end()) for m in _WORD.finditer(caption) if m.group(0).lower() in PERSON_NOUNS]


def link_subjects(caption: str, num_subjects: int) -> list[NounPhrase]:
    """The noun phrase of each subject (subjects in left-to-right order), or LinkError naming the mismatch."""
    phrases = person_noun_phrases(caption)
    if len(phrases) == num_subjects:
        return phrases
    groups = sorted({m.group(0).lower() for m in _WORD.finditer(caption) if m.group(0).lower() in GROUP_NOUNS})
    found = f"{len(phrases)} person noun{'s' if len(phrases) != 1 else ''}"
    if phrases:
        found += f" ({', '.join(p.noun for p in phrases)})"
    hint = f"; group nouns {', '.join(groups)} cannot be linked per person" if groups else ""
    raise LinkError(f"caption has {found} for {num_subjects} detected face{'s' if num_subjects != 1 else ''}{hint}")
