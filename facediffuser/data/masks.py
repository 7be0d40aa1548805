"""One mask per detected person, from mediapipe's bundled selfie-segmentation model.

The split rule (docs/preprocessing.md):
1. Each face box (width w, height h, centre cx) defines that person's crop: x from cx − 2.5w to cx + 2.5w, y from
   the face top − h down to the face bottom + 6h (clipped to the image). A person is about 7 heads tall and
   3–4 face widths across the shoulders, and the selfie model works best on such a person-centred crop.
2. The model runs on each crop; its foreground probability is pasted back (0 outside the crop).
3. A pixel belongs to person k when k's probability there exceeds 0.5; when several people claim a pixel it
   goes to the one whose face centre is nearest horizontally, measured in face widths (|x − cx_k| / w_k).
Masks therefore never overlap. The face mask is the ellipse inscribed in the face box.
"""

from __future__ import annotations

import numpy as np

from facediffuser.data.faces import Face

FOREGROUND_THRESHOLD = 0.5
CROP_HALF_WIDTH = 2.5  # face widths either side of the face centre
CROP_ABOVE = 1.0  # face heights above the face box
CROP_BELOW = 6.0  # face heights below the face box


def person_crop(face: Face, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = face.box
    face_w, face_h, cx = x2 - x1, y2 - y1, (x1 + x2) / 2
    left = int(max(0, np.floor(cx - CROP_HALF_WIDTH * face_w)))
    right = int(min(width, np.ceil(cx + CROP_HALF_WIDTH * face_w)))
    top = int(max(0, np.floor(y1 - CROP_ABOVE * face_h)))
    bottom = int(min(height, np.ceil(y2 + CROP_BELOW * face_h)))
    return left, top, right, bottom


def split_foreground(probabilities: list[np.ndarray], faces: list[Face]) -> list[np.ndarray]:
    """Per-person foreground probabilities [H, W] → non-overlapping bool masks (rule step 3)."""
    if not faces:
        return []
    height, width = probabilities[0].shape
    columns = np.arange(width, dtype=np.float32)
    # distance of every pixel column to each face centre, in that face's widths; +inf where not foreground
    distance = np.stack(
        [
            np.where(p > FOREGROUND_THRESHOLD, np.abs(columns - f.center_x)[None, :] / max(f.width, 1.0), np.inf)
            for p, f in zip(probabilities, faces)
        ]
    )
    owner = np.argmin(distance, axis=0)
    claimed = np.isfinite(distance.min(axis=0))
    return [claimed & (owner == k) for k in range(len(faces))]


def face_ellipse(face: Face, width: int, height: int) -> np.ndarray:
    x1, y1, x2, y2 = face.box
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    rx, ry = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    return ((xs - (x1 + x2) / 2) / rx) ** 2 + ((ys - (y1 + y2) / 2) / ry) ** 2 <= 1.0


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight [x1, y1, x2, y2] pixel box of a non-empty mask (x2/y2 exclusive)."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y1, y2 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    x1, x2 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return [float(x1), float(y1), float(x2), float(y2)]


class PersonSegmenter:
    """mediapipe selfie segmentation (general model, bundled in the wheel) applied per person crop."""

    def __init__(self):
        import mediapipe as mp

        self._model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)

    def foreground(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] → foreground probability float32 [H, W]."""
        return np.asarray(self._model.process(np.ascontiguousarray(image)).segmentation_mask, dtype=np.float32)

    def __call__(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """One bool mask [H, W] per face, in the order of `faces` (rule in the module docstring)."""
        height, width = image.shape[:2]
        probabilities = []
        for face in faces:
            left, top, right, bottom = person_crop(face, width, height)
            full = np.zeros((height, width), dtype=np.float32)
            if right > left and bottom > top:  # a degenerate face box gives an empty crop: mediapipe would abort
                full[top:bottom, left:right] = self.foreground(image[top:bottom, left:right])
            probabilities.append(full)
        return split_foreground(probabilities, faces)

    def close(self) -> None:
        self._model.close()
