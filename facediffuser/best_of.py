"""Best-of-n and a minimum likeness: make more candidates than asked, score each against its references, keep the best.

`best_of: n` samples n candidates per requested image (in one denoising batch) and returns the best k, ranked by
their weakest subject's similarity (`identity_score`); a candidate with a blend warning (a copied face, merged
subjects) ranks after every candidate without one. `min_identity` then asks that every returned image clears that
score: while fewer than k candidates do, another round of k × n candidates is sampled with the next seeds, at most
`max_retries` times, after which the best k are returned with a warning that says so.

Every candidate's seed, round and scores are kept (`Candidate`), so any of them can be regenerated alone with its
seed. No Ray and no model here: `select_best` takes a function that samples and scores one round.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

MAX_BEST_OF = 8
MAX_RETRIES = 5


@dataclass(frozen=True)
class Selection:
    best_of: int = 1
    min_identity: float | None = None  # every returned image's weakest subject must reach this similarity
    max_retries: int = 2  # rounds sampled after the first, at most, to meet min_identity

    def __post_init__(self):
        if not 1 <= self.best_of <= MAX_BEST_OF:
            raise ValueError(f"best_of must be in 1..{MAX_BEST_OF}, got {self.best_of}")
        if self.min_identity is not None and not 0.0 <= self.min_identity <= 1.0:
            raise ValueError(f"min_identity must be in [0, 1], got {self.min_identity}")
        if not 0 <= self.max_retries <= MAX_RETRIES:
            raise ValueError(f"max_retries must be in 0..{MAX_RETRIES}, got {self.max_retries}")

    @property
    def active(self) -> bool:
        return self.best_of > 1 or self.min_identity is not None

    def check_call(self, generator, output_type: str) -> None:
        """A pipeline call's options that selection cannot work with."""
        if self.active and (generator is not None or output_type == "latent"):
            raise ValueError("best_of and min_identity need seeds (not a generator) and images (not latents)")


@dataclass
class Candidate:
    seed: int
    round: int
    similarities: list[float | None]  # per subject; None: no face found for it
    score: float  # the weakest subject's similarity (identity_score)
    warnings: list[str] = field(default_factory=list)  # blend warnings
    chosen: bool = False

    @property
    def rank_key(self) -> tuple:
        return bool(self.warnings), -self.score, self.seed

    def as_dict(self) -> dict:
        return asdict(self)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: no blend warning before any warning, then the higher weakest-subject score, then the seed."""
    return sorted(candidates, key=lambda c: c.rank_key)


def shortfall(chosen: list[Candidate], min_identity: float | None) -> int:
    """How many of the chosen images miss min_identity."""
    return 0 if min_identity is None else sum(c.score < min_identity for c in chosen)


class CandidatePool:
    """The candidates of one call, round by round: `next_round()` says which seeds to sample next (None when done),
    `add` takes a round's images and Candidates, `result()` picks. Round r uses the seeds that follow round r - 1's,
    so every candidate has its own seed. Used as it is by async callers (the service); `select_best` drives it."""

    def __init__(self, count: int, first_seed: int, selection: Selection):
        self.count, self.selection = count, selection
        self.per_round = count * selection.best_of
        self.seed, self.rounds = first_seed, 0
        self.pool: list[tuple[Candidate, object]] = []

    def next_round(self) -> tuple[int, int] | None:
        """(first seed, candidates) of the next round, or None when the chosen ones suffice or no retry is left."""
        if self.rounds and (self.selection.min_identity is None or self._shortfall() == 0):
            return None
        if self.rounds > self.selection.max_retries:
            return None
        return self.seed, self.per_round

    def add(self, images: list, candidates: list[Candidate]) -> None:
        for image, candidate in zip(images, candidates):
            candidate.round = self.rounds
            self.pool.append((candidate, image))
        self.rounds += 1
        self.seed += self.per_round

    def _chosen(self) -> list[Candidate]:
        return rank([c for c, _ in self.pool])[: self.count]

    def _shortfall(self) -> int:
        return shortfall(self._chosen(), self.selection.min_identity)

    def result(self):
        """→ (the chosen images best first, their candidates, every candidate in sampling order, a warning or None)."""
        chosen = self._chosen()
        for candidate in chosen:
            candidate.chosen = True
        images = {id(c): image for c, image in self.pool}
        missing, warning = self._shortfall(), None
        if missing:
            warning = (
                f"min_identity {self.selection.min_identity:g} not met: after {self.rounds} round(s) of "
                f"{self.per_round} candidates, {missing} of the {self.count} returned image(s) score under it (best "
                f"weakest-subject similarity {chosen[0].score:.3f})"
            )
        return [images[id(c)] for c in chosen], chosen, [c for c, _ in self.pool], warning


def select_best(
    sample: Callable[[int, int], tuple[list, list[Candidate]]], count: int, first_seed: int, selection: Selection
):
    """`sample(first_seed, n)` → (n images, their n Candidates) samples and scores one round (an "image" is whatever
    the caller keeps per candidate); → CandidatePool.result()."""
    pool = CandidatePool(count, first_seed, selection)
    while (round_ := pool.next_round()) is not None:
        pool.add(*sample(*round_))
    return pool.result()


def best_of_output(sample: Callable, count: int, first_seed: int, selection: Selection):
    """The pipeline's call with a Selection: `sample(first_seed, n)` → a scored FaceDiffuserOutput of n images;
    → one FaceDiffuserOutput of the `count` chosen images (best first) with every candidate recorded."""
    last = {}

    def scored_round(seed: int, n: int):
        output = last["output"] = sample(seed, n)
        per_image = [
            (output.images[b], None if output.masks is None else output.masks[:, b], identity)
            for b, identity in enumerate(output.identities)
        ]
        candidates = [
            Candidate(s, 0, identity.similarities, identity.score, identity.warnings)
            for s, identity in zip(output.seeds, output.identities)
        ]
        return per_image, candidates

    chosen, chosen_candidates, pool, warning = select_best(scored_round, count, first_seed, selection)
    images = [image for image, _, _ in chosen]
    masks = [mask for _, mask, _ in chosen]
    identities = [identity for _, _, identity in chosen]
    return replace(
        last["output"],
        images=torch.stack(images) if isinstance(images[0], torch.Tensor) else images,
        seeds=[c.seed for c in chosen_candidates],
        masks=None if masks[0] is None else torch.stack(masks, dim=1),
        identity_scores=[identity.similarities for identity in identities],
        identity_warnings=[identity.warnings for identity in identities],
        identities=identities,
        warnings=[warning] if warning else [],
        candidates=[c.as_dict() for c in pool],
    )


def selected(sample: Callable, seed: int | None, count: int, selection: Selection):
    """The pipeline's images: one round of `count` from `seed` (random when None), or with best_of / min_identity
    the chosen ones of as many rounds as it takes (`best_of_output`)."""
    if not selection.active:
        return sample(seed, count)
    first_seed = random.randrange(2**31) if seed is None else int(seed)
    return best_of_output(sample, count, first_seed, selection)
