"""Shard rows (facediffuser/data/schema.py) → training tensors, with METHOD.md §3's augmentation.

Pure torch/numpy: the Ray Train workers run `ExampleBuilder` as Ray Data's collate function
(`pipelines/train_worker.py`, built by `facediffuser.training.ingest`); the benchmark and tests call it
directly. Every array has a fixed shape (subjects padded to `max_subjects`) so batches stack.

Target image: short side → `resolution`, horizontal flip (p .5, jointly with the masks), then a centre crop
for landscape images or black side padding + resize for portrait ones. Subject masks always follow the image
with nearest-neighbour resizing (the official portrait path resized them bilinearly; METHOD.md §3 quirk).
Object crops come from the stored (full-resolution) image: pixels outside the person mask become uniform
noise, the crop is cut to the person box, then zoom-in → pad square → resize → affine → colour jitter →
blur → greyscale → flip → elastic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T

from facediffuser.data.schema import Record, decode_mask
from facediffuser.images import decode_image, pad_to_square, pil_to_tensor
from facediffuser.prompts import DEFAULT_MAX_SUBJECTS, insert_markers, tokenize_with_markers
from facediffuser.reference import person_cutout


@dataclass(frozen=True)
class DataConfig:
    model: str  # "sdm" or "tdm"
    resolution: int = 512  # target image side
    object_resolution: int = 224  # subject crop side (the CLIP encoder's input size)
    max_subjects: int = DEFAULT_MAX_SUBJECTS
    subject_keep_prob: float = 0.9  # SDM: each subject kept with this probability (`object_appear_prob`)
    uncondition_prob: float = 0.1  # SDM: empty caption and no subjects
    caption_dropout_prob: float = 0.1  # TDM: caption set to ""
    flip_prob: float = 0.5

    def __post_init__(self):
        if self.model not in ("sdm", "tdm"):
            raise ValueError(f"model must be 'sdm' or 'tdm', got {self.model!r}")


def _object_augmentation(size: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomApply([T.RandomAffine(degrees=30, interpolation=T.InterpolationMode.BILINEAR)], p=0.75),
            T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.5)], p=0.5),
            T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
            T.RandomGrayscale(p=0.1),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ElasticTransform()], p=0.5),
        ]
    )


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def _resize_nearest(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    return F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0]


def transform_target(image: torch.Tensor, masks: torch.Tensor, resolution: int, flip: bool):
    """[3, H, W] in [0, 1] and [K, H, W] masks → ([3, R, R], [K, R, R]) per METHOD.md §3 (masks nearest)."""
    _, height, width = image.shape
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    image, masks = _resize(image, size), _resize_nearest(masks, size)
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
    height, width = size
    if width > height:  # landscape: centre crop
        left = (width - resolution) // 2
        image, masks = image[:, :, left : left + resolution], masks[:, :, left : left + resolution]
    elif height > width:  # portrait: pad the sides with black, then resize
        image = pad_to_square(image)
        square = masks.new_zeros(masks.shape[0], height, height)
        left = (height - width) // 2
        square[:, :, left : left + width] = masks
        image, masks = _resize(image, (resolution, resolution)), _resize_nearest(square, (resolution, resolution))
    return image, masks


class ExampleBuilder:
    """Callable on a batch of shard rows (a pyarrow Table, a list of dicts or a dict of columns).

    Returns a dict of stacked numpy arrays:
      pixel_values [B, 3, R, R] float32 in [-1, 1]; input_ids [B, L] int64 (markers removed);
      SDM only: image_token_mask [B, L] bool; token_index [B, K] int64; num_subjects [B] int64;
      subject_valid [B, K] bool; object_pixel_values [B, K, 3, S, S] float32 in [0, 1];
      subject_masks [B, K, R, R] float32 in {0, 1} (in the target image's frame).
    """

    def __init__(self, config: DataConfig, tokenizer, seed: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        if seed is not None:
            torch.manual_seed(seed)  # torchvision's random transforms draw from torch's global generator
        self.object_augmentation = _object_augmentation(config.object_resolution)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        if hasattr(batch, "to_pylist"):
            rows = batch.to_pylist()
        elif isinstance(batch, dict):
            columns = list(batch)
            rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        else:
            rows = list(batch)
        examples = [self.example(Record.from_row(row)) for row in rows]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    # ------------------------------------------------------------------ one row
    def example(self, record: Record) -> dict[str, np.ndarray]:
        config = self.config
        image = pil_to_tensor(decode_image(record.image, name=record.id))
        if config.model == "tdm":
            target, _ = transform_target(image, image.new_zeros(0, *image.shape[1:]), config.resolution, self._flip())
            caption = "" if self.rng.random() < config.caption_dropout_prob else record.caption
            tokens = tokenize_with_markers(self.tokenizer, caption, config.max_subjects)
            return {"pixel_values": (target * 2 - 1).numpy(), "input_ids": tokens.input_ids.numpy()}

        unconditional = self.rng.random() < config.uncondition_prob
        subjects = [] if unconditional else self._pick_subjects(record)
        masks = [torch.from_numpy(decode_mask(s.mask_png)) for s in subjects]
        for subject, mask in zip(subjects, masks):
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise ValueError(f"{record.id}: subject mask is {tuple(mask.shape)}, image is {tuple(image.shape[1:])}")
        subjects, masks, tokens = self._tokenize("" if unconditional else record.caption, subjects, masks)
        stacked = torch.stack(masks) if masks else image.new_zeros(0, *image.shape[1:])
        target, target_masks = transform_target(image, stacked, config.resolution, self._flip())

        k, size, res = config.max_subjects, config.object_resolution, config.resolution
        objects = np.zeros((k, 3, size, size), np.float32)
        subject_masks = np.zeros((k, res, res), np.float32)
        token_index = np.zeros(k, np.int64)
        valid = np.zeros(k, bool)
        flagged = torch.nonzero(tokens.image_token_mask).flatten().tolist()
        for slot, (subject, mask) in enumerate(zip(subjects, masks)):
            objects[slot] = self.object_crop(image, mask, subject.person_box).numpy()
            subject_masks[slot] = target_masks[slot].numpy()
            token_index[slot] = flagged[slot]
            valid[slot] = True
        return {
            "pixel_values": (target * 2 - 1).numpy(),
            "input_ids": tokens.input_ids.numpy(),
            "image_token_mask": tokens.image_token_mask.numpy(),
            "token_index": token_index,
            "num_subjects": np.int64(len(subjects)),
            "subject_valid": valid,
            "object_pixel_values": objects,
            "subject_masks": subject_masks,
        }

    def _flip(self) -> bool:
        return self.rng.random() < self.config.flip_prob

    def _pick_subjects(self, record: Record):
        """At most `max_subjects` at random (then sorted into caption order), each kept with p=subject_keep_prob."""
        config = self.config
        subjects = list(record.subjects)
        if len(subjects) > config.max_subjects:
            subjects = self.rng.sample(subjects, config.max_subjects)
        subjects = [s for s in subjects if self.rng.random() < config.subject_keep_prob]
        return sorted(subjects, key=lambda s: s.noun_end)

    def _tokenize(self, caption: str, subjects: list, masks: list):
        """Caption with a marker after each kept subject's noun.

        Subjects whose marker cannot be placed (beyond the 77-token window, or sharing a noun with the
        previous subject) are dropped from the end until the prompt tokenizes.
        """
        while True:
            prompt = insert_markers(caption, [s.noun_end for s in subjects]) if subjects else caption
            try:
                return subjects, masks, tokenize_with_markers(self.tokenizer, prompt, self.config.max_subjects)
            except ValueError:
                if not subjects:
                    raise
                subjects, masks = subjects[:-1], masks[:-1]

    def object_crop(self, image: torch.Tensor, mask: torch.Tensor, box) -> torch.Tensor:
        """[3, H, W] image + [H, W] person mask → augmented [3, S, S] crop with a noise background (the reference
        mode `person` is this crop without the random parts: facediffuser.reference)."""
        crop = person_cutout(image, mask, box)
        if self.rng.random() < 0.5:  # zoom in 1–2×: a random window 1/z of the crop's size
            zoom = self.rng.uniform(1.0, 2.0)
            h, w = crop.shape[1:]
            ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
            top, left = self.rng.randint(0, h - ch), self.rng.randint(0, w - cw)
            crop = crop[:, top : top + ch, left : left + cw]
        size = self.config.object_resolution
        crop = _resize(pad_to_square(crop), (size, size))
        return self.object_augmentation(crop).clamp(0, 1)
