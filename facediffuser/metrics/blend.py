"""The blend guard: the failures people report most when a picture holds two or more people, found from the identity
descriptors of the generated faces and of the references (facediffuser/metrics/identity.py computes both)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def blend_warnings(faces: np.ndarray, references: Sequence[np.ndarray | None]) -> list[str]:
    """The failures people report most with several subjects, found from the identity descriptors alone:
    - a copied face: two or more faces whose most similar subject is the same one (one person pasted twice);
    - merged subjects: two or more subjects whose most similar face is the same one (one face for two people,
      or a blend of them).
    Faces are numbered in detection order (most confident first), subjects in marker order, from 1."""
    known = [i for i, ref in enumerate(references) if ref is not None]
    if len(known) < 2 or len(faces) == 0:
        return []
    similarity = faces @ np.stack([references[i] for i in known]).T  # [faces, known subjects]
    warnings = []
    nearest_subject = np.argmax(similarity, axis=1)
    for column in range(len(known)):
        copies = np.flatnonzero(nearest_subject == column) + 1
        if len(copies) > 1:
            listed = ", ".join(str(f) for f in copies)
            warnings.append(f"copied face: subject {known[column] + 1} is the closest match of faces {listed}")
    nearest_face = np.argmax(similarity, axis=0)
    for face in sorted(set(nearest_face.tolist())):
        subjects = [known[c] + 1 for c in np.flatnonzero(nearest_face == face)]
        if len(subjects) > 1:
            listed = " and ".join(str(s) for s in subjects)
            warnings.append(f"merged subjects: subjects {listed} all match face {face + 1} best")
    return warnings
