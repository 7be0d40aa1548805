"""The evaluation's Ray Data stages (map_batches actor classes; they import no Ray themselves):
GenerateImages (one pipeline per actor) → ScoreImages (identity and prompt-consistency scorers loaded once)."""

from __future__ import annotations

import io
import json

import pyarrow as pa

from facediffuser.metrics.protocol import method_arguments


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


class GenerateImages:
    """One pipeline per actor; each task (one prompt, one method) → `images_per_prompt` image rows."""

    def __init__(self, config):
        from facediffuser.model_loading import load_pipeline
        from facediffuser.schedulers import make_scheduler

        self.config = config
        self.pipe = load_pipeline(config.model, config.tiny).to(_device(config.num_gpus))
        self.pipe.scheduler = make_scheduler(config.scheduler, self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.num_iterations = self.pipe.resolve_boundaries(config.steps)[0]
        self.references: dict[str, object] = {}

    def _reference(self, entry):
        """One subject's reference: a path, or a list of paths (several photos of one person)."""
        from facediffuser.images import load_image

        if isinstance(entry, list):
            return [self._reference(path) for path in entry]
        if entry not in self.references:
            self.references[entry] = load_image(entry)
        return self.references[entry]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        config, rows = self.config, []
        for task in batch.to_pylist():
            with_masks = task["method"] in ("snf", "average")
            result = self.pipe(
                task["prompt"],
                [self._reference(p) for p in json.loads(task["references"])],
                num_images_per_prompt=config.images_per_prompt,
                seed=task["seed"],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                height=config.resolution,
                width=config.resolution,
                return_masks=with_masks,
                reference_mode=config.reference_mode,
                check_references=False,  # checked once by the driver, before any actor started
                **method_arguments(task["method"], self.num_iterations, config.alpha, config.beta),
            )
            for index, image in enumerate(result.images):
                mask = b""
                if with_masks and result.masks.shape[0]:
                    mean = result.masks[:, index].mean(dim=0).clamp(0, 1).numpy()
                    mask = _png(Image.fromarray((mean * 255).round().astype("uint8")))
                rows.append(
                    {
                        **task,
                        "image_index": index,
                        "image_seed": result.seeds[index],
                        "embedding_sha256": json.dumps(result.embedding_sha256),
                        "image": _png(image),
                        "mask": mask,
                    }
                )
        return pa.Table.from_pylist(rows)


class ScoreImages:
    """Identity (dlib always, FaceNet with --facenet-weights) and CLIP prompt consistency (with --clip)."""

    def __init__(self, config):
        from facediffuser.metrics.identity import DlibEmbedder, FacenetEmbedder, IdentityScorer
        from facediffuser.metrics.prompt import ClipPromptScorer

        device = _device(config.score_gpus)
        self.scorers = [IdentityScorer(DlibEmbedder())]
        if config.facenet_weights:
            self.scorers.append(IdentityScorer(FacenetEmbedder(config.facenet_weights, device)))
        self.clip = ClipPromptScorer(config.clip, device) if config.clip else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        images = [Image.open(io.BytesIO(row["image"])).convert("RGB") for row in rows]
        for scorer in self.scorers:
            name = scorer.name
            for row, image in zip(rows, images):
                references = [scorer.reference(entry, key=json.dumps(entry)) for entry in json.loads(row["references"])]
                result = scorer.score(image, references)
                row.update(
                    {
                        f"identity_{name}": result.score,
                        f"faces_{name}": result.num_faces,
                        f"missing_{name}": result.missing_faces,
                        f"duplicate_{name}": result.duplicate,
                        f"blend_{name}": bool(result.warnings),  # a copied face or merged subjects
                        f"blend_warnings_{name}": json.dumps(result.warnings),
                        f"similarities_{name}": json.dumps(result.similarities),
                    }
                )
        if self.clip is not None:
            for row, score in zip(rows, self.clip.score(images, [row["prompt"] for row in rows])):
                row["prompt_clip"] = score
        return pa.Table.from_pylist(rows)
