"""Face detection on one RGB image: mediapipe's bundled full-range BlazeFace (default) or facenet-pytorch MTCNN.

Both return `Face`s with pixel boxes [x1, y1, x2, y2] in the given image, sorted left to right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DETECTORS = ("mediapipe", "mtcnn")
DEFAULT_MIN_SCORE = 0.5
OVERLAP_IOU = 0.3  # two boxes overlapping more than this are the same face


@dataclass
class Face:
    box: list[float]  # [x1, y1, x2, y2] pixels
    score: float

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


def iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def suppress_overlaps(faces: list[Face], threshold: float = OVERLAP_IOU) -> list[Face]:
    """Greedy non-maximum suppression, then left-to-right order (the order subjects are captioned in)."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(iou(face.box, other.box) <= threshold for other in kept):
            kept.append(face)
    return sorted(kept, key=lambda f: (f.center_x, f.box[1]))


def _clip_box(box, width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]


class MediapipeFaceDetector:
    """BlazeFace full range (the model bundled in mediapipe 0.10.21; works offline).

    The model sees a 192×192 square, so on wide or tall images faces shrink below what it finds. Such images
    are scanned with square windows (side = the short side, stride half of it) and the boxes merged by NMS.
    """

    def __init__(self, min_score: float = DEFAULT_MIN_SCORE):
        import mediapipe as mp

        self.min_score = min_score
        self._model = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_score)

    def _detect_window(self, image: np.ndarray, x0: int, y0: int) -> list[Face]:
        height, width = image.shape[:2]
        result = self._model.process(np.ascontiguousarray(image))
        faces = []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            box = [
                rel.xmin * width + x0,
                rel.ymin * height + y0,
                (rel.xmin + rel.width) * width + x0,
                (rel.ymin + rel.height) * height + y0,
            ]
            faces.append(Face(box=box, score=float(detection.score[0])))
        return faces

    def __call__(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        side = min(height, width)
        faces: list[Face] = []
        if side < 2:  # a line of pixels holds no face (and a window of side 1 would mean thousands of calls)
            return []
        if max(height, width) <= 1.5 * side:
            faces = self._detect_window(image, 0, 0)
        else:
            starts = list(range(0, max(height, width) - side + 1, side // 2))
            if starts[-1] != max(height, width) - side:
                starts.append(max(height, width) - side)
            for start in starts:
                if width > height:
                    faces += self._detect_window(image[:, start : start + side], start, 0)
                else:
                    faces += self._detect_window(image[start : start + side, :], 0, start)
        faces = [Face(_clip_box(f.box, width, height), f.score) for f in faces if f.score >= self.min_score]
        return suppress_overlaps(faces)

    def close(self) -> None:
        self._model.close()


class MtcnnFaceDetector:
    """facenet-pytorch MTCNN (its weights ship in the wheel), thresholds as in the evaluation protocol."""

    def __init__(self, min_score: float = DEFAULT_MIN_SCORE, device: str = "cpu"):
        from facenet_pytorch import MTCNN

        self.min_score = min_score
        self._model = MTCNN(keep_all=True, min_face_size=20, thresholds=[0.6, 0.7, 0.7], device=device)

    def __call__(self, image: np.ndarray) -> list[Face]:
        from PIL import Image

        height, width = image.shape[:2]
        boxes, scores = self._model.detect(Image.fromarray(image))
        if boxes is None:
            return []
        faces = [Face(_clip_box(b, width, height), float(s)) for b, s in zip(boxes, scores) if s >= self.min_score]
        return suppress_overlaps(faces)

    def close(self) -> None:
        pass


def make_detector(name: str, min_score: float = DEFAULT_MIN_SCORE, device: str = "cpu"):
    if name == "mediapipe":
        return MediapipeFaceDetector(min_score)
    if name == "mtcnn":
        return MtcnnFaceDetector(min_score, device=device)
    raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")
