"""What a training worker needs to turn shard rows into batches, read from the base model without loading weights:
the target and object-crop sizes, the tokenizer, and the `ExampleBuilder` made of them (no Ray here;
`pipelines/train_worker.py` wraps the builder as Ray Data's collate function, the benchmark calls it inline).

`base` is a local model directory (see `model_dir.model_root` for the layouts it may have); `tiny=True` means the
small random test models and needs no base.
"""

from __future__ import annotations

import json
from pathlib import Path

from facediffuser import model_dir
from facediffuser.training.data import DataConfig, ExampleBuilder


def model_sizes(model: str, base: str | None, tiny: bool = False, resolution: int | None = None) -> tuple[int, int]:
    """(target resolution, object crop size) from the base's configs, without loading weights. `resolution`
    overrides the model's native size (512 for SD 1.5, 128 for the tiny models)."""
    if tiny:
        from facediffuser.models.tiny import TINY_IMAGE_SIZE, TINY_OBJECT_SIZE

        native, objects = TINY_IMAGE_SIZE, TINY_OBJECT_SIZE
    else:
        from diffusers import UNet2DConditionModel

        root, folder = model_dir.model_root(Path(base), model)
        native = UNet2DConditionModel.load_config(str(root), subfolder=folder)["sample_size"] * 8
        subject = model_dir.subject_encoder_dir(Path(base), model)
        objects = json.loads((subject / "config.json").read_text())["vision_config"]["image_size"] if subject else 224
    return resolution or native, objects


def load_tokenizer(model: str, base: str | None, tiny: bool = False):
    """The base's CLIP tokenizer, with the `<|image|>` token added (the tiny models' own one with `tiny`)."""
    from transformers import CLIPTokenizer

    from facediffuser.prompts import ensure_image_token

    if tiny:
        from facediffuser.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    folder = model_dir.shared_root(Path(base), model) / model_dir.TOKENIZER
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    ensure_image_token(tokenizer)
    return tokenizer


def example_builder(
    model: str, base: str | None, tiny: bool = False, resolution: int | None = None, seed: int | None = None
) -> ExampleBuilder:
    """Shard rows (pyarrow) → training arrays for `model` at the base's sizes, augmentation seeded by `seed`."""
    target, objects = model_sizes(model, base, tiny, resolution)
    return ExampleBuilder(
        DataConfig(model, resolution=target, object_resolution=objects), load_tokenizer(model, base, tiny), seed=seed
    )
