"""Preprocessing stages as plain functions (no Ray): real face models on real photos, linking, FastComposer
conversion, and the CLI's one-line errors before any work."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from facediffuser.data import stages
from facediffuser.data.captions import template_caption
from facediffuser.data.faces import Face, make_detector, suppress_overlaps
from facediffuser.data.fastcomposer import convert_stage, list_fastcomposer_items
from facediffuser.data.linking import LinkError, link_subjects
from facediffuser.data.masks import PersonSegmenter
from facediffuser.data.schema import decode_mask
from facediffuser.prompts import insert_markers

# The astronaut's face in skimage's 512×512 photo (checked by eye; both detectors agree within a few pixels).
ASTRONAUT_FACE = (174, 68, 278, 172)


def tile(photo: np.ndarray, count: int) -> np.ndarray:
    """`count` people side by side (every other copy mirrored, so the row is not a plain repeat)."""
    return np.ascontiguousarray(np.concatenate([photo if i % 2 == 0 else photo[:, ::-1] for i in range(count)], axis=1))


def expected_faces(count: int) -> list[tuple[int, int, int, int]]:
    x1, y1, x2, y2 = ASTRONAUT_FACE
    return [(x1 + 512 * i, y1, x2 + 512 * i, y2) if i % 2 == 0 else (512 * i + 512 - x2, y1, 512 * i + 512 - x1, y2)
            for i in range(count)]


def center_inside(box, target, slack=10) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return target[0] - slack <= cx <= target[2] + slack and target[1] - slack <= cy <= target[3] + slack


@pytest.fixture(scope="module")
def mediapipe_models():
    detector, segmenter = make_detector("mediapipe"), PersonSegmenter()
    yield detector, segmenter
    detector.close()
    segmenter.close()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_mediapipe_faces_masks_captions_links_on_real_photos(astronaut, mediapipe_models, count):
    detector, segmenter = mediapipe_models
    image = tile(astronaut, count)
    faces = detector(image)
    assert len(faces) == count
    for face, target in zip(faces, expected_faces(count)):  # left to right, each on its person's face
        assert center_inside(face.box, target), (face.box, target)
        assert 0.5 <= face.score <= 1.0
    masks = segmenter(image, faces)
    assert len(masks) == count
    union = np.zeros(image.shape[:2], dtype=int)
    for index, (face, mask) in enumerate(zip(faces, masks)):
        x1, y1, x2, y2 = (round(v) for v in face.box)
        assert mask[y1:y2, x1:x2].mean() > 0.8  # the person's mask covers their face box
        tile_share = mask[:, 512 * index : 512 * (index + 1)].sum() / mask.sum()
        assert tile_share > 0.9  # and lies on that person, not on the neighbour
        union += mask
    assert union.max() == 1  # masks never overlap
    caption = template_caption(count)
    phrases = link_subjects(caption, count)
    assert [p.noun for p in phrases] == ["person"] * count
    for phrase in phrases:
        assert caption[phrase.end - len("person") : phrase.end] == "person"
    assert insert_markers(caption, [p.end for p in phrases]).count("person <|image|>") == count


def test_mtcnn_finds_the_same_faces(astronaut):
    detector = make_detector("mtcnn")
    faces = detector(tile(astronaut, 2))
    assert len(faces) == 2
    for face, target in zip(faces, expected_faces(2)):
        assert center_inside(face.box, target)
        assert face.score > 0.9
    assert detector(np.full((200, 200, 3), 128, np.uint8)) == []


def test_overlapping_boxes_are_one_face():
    faces = suppress_overlaps([Face([0, 0, 10, 10], 0.6), Face([1, 1, 11, 11], 0.9), Face([50, 0, 60, 10], 0.7)])
    assert [(f.box[0], f.score) for f in faces] == [(1, 0.9), (50, 0.7)]


def test_linking_order_offsets_and_reasons():
    caption = "A young man and a woman, with a girl."
    with pytest.raises(LinkError, match=r"3 person nouns \(man, woman, girl\) for 2 detected faces"):
        link_subjects(caption, 2)
    phrases = link_subjects("a man and a woman on a beach", 2)
    assert [(p.noun, p.end) for p in phrases] == [("man", 5), ("woman", 17)]
    phrases = link_subjects("Woman's portrait", 1)
    assert [(p.noun, p.end) for p in phrases] == [("Woman", 5)]
    with pytest.raises(LinkError, match="group nouns couple, people"):
        link_subjects("a couple of people at a wedding", 2)
    with pytest.raises(LinkError, match="0 person nouns for 1 detected face"):
        link_subjects("a mannequin by a man-made lake", 1)  # whole words only
    assert template_caption(5).count("person") == 5


def _fastcomposer_tree(root, photo: np.ndarray) -> None:
    """Two people in one photo (FastComposer layout), one sample without its npy, one with a bad end."""
    chunk = root / "00000"
    chunk.mkdir(parents=True)
    image = tile(photo, 2)[:, :1000]  # 1000×512
    Image.fromarray(image).save(chunk / "00001.jpg", quality=95)
    ids = np.zeros(image.shape[:2], np.int32)
    ids[40:512, 20:480] = 7  # right person listed first in the json: the converter orders by `end`
    ids[40:512, 520:990] = 3
    caption = "a man and a woman standing in a hall"
    segments = [
        {"id": 3, "bbox": [520, 40, 990, 512], "coco_label": "person", "end": 17},
        {"id": 9, "bbox": [0, 0, 5, 5], "coco_label": "chair", "end": 36},
        {"id": 7, "bbox": [20, 40, 480, 512], "coco_label": "person", "end": 5},
    ]
    (chunk / "00001.json").write_text(json.dumps({"caption": caption, "segments": segments}))
    np.save(chunk / "00001.npy", ids)
    Image.fromarray(image).save(chunk / "00002.jpg")
    (chunk / "00002.json").write_text(json.dumps({"caption": caption, "segments": segments}))
    Image.fromarray(image).save(chunk / "00003.jpg")
    (chunk / "00003.json").write_text(json.dumps({"caption": caption, "segments": [{**segments[0], "end": 99}]}))
    np.save(chunk / "00003.npy", ids)


def test_fastcomposer_conversion(tmp_path, astronaut):
    _fastcomposer_tree(tmp_path, astronaut)
    config = stages.PreprocessConfig(input=str(tmp_path), output=str(tmp_path / "out"), source="fastcomposer",
                                     resolution=256)
    items = [convert_stage(item, config) for item in list_fastcomposer_items(str(tmp_path))]
    assert [i["id"] for i in items] == ["00001", "00002", "00003"]
    assert items[1]["stage"] == "read" and "00002.npy" in items[1]["reason"]
    assert items[2]["stage"] == "convert" and "end 99" in items[2]["reason"]
    record = stages.to_record(items[0])
    assert (record.width, record.height) == (500, 256)  # short side → 256, aspect kept
    assert [(s.noun, s.noun_end) for s in record.subjects] == [("man", 5), ("woman", 17)]
    left, right = (decode_mask(s.mask_png) for s in record.subjects)
    assert left.shape == (256, 500) and left[128, 100] and not left[128, 400] and right[128, 400]
    assert record.subjects[1].person_box == pytest.approx([260, 20, 495, 256])
    assert record.subjects[0].score == 0.0 and record.subjects[0].face_mask_png is None
    assert stages.shard_table(items).num_rows == 1 and stages.reject_table(items).num_rows == 2


def test_unusual_images_decode_and_bad_ones_are_rejected_with_reasons(astronaut):
    config = stages.PreprocessConfig(input="-", output="-", resolution=256, max_pixels=600 * 600)

    def read(data: bytes, name="x.png"):
        import tempfile, os

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, name)
            with open(path, "wb") as handle:
                handle.write(data)
            return stages.read_stage(stages.new_item(name, path), config)

    def encoded(image: Image.Image, fmt="PNG", **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    photo = Image.fromarray(astronaut)
    cmyk = read(encoded(photo.convert("CMYK"), "JPEG"), "c.jpg")
    grey16 = read(encoded(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG"))
    assert cmyk["stage"] is None and grey16["stage"] is None
    assert (cmyk["width"], grey16["height"]) == (256, 256)
    assert read(b"")["reason"].endswith("empty file")
    assert "truncated" in read(encoded(photo, "JPEG")[:3000], "t.jpg")["reason"]
    assert "not a decodable image" in read(b"<html>not an image</html>", "h.jpg")["reason"]
    assert "exceeds the limit" in read(encoded(Image.new("RGB", (700, 700))))["reason"]
    missing = stages.read_stage(stages.new_item("gone.jpg", "/nonexistent/gone.jpg"), config)
    assert missing["stage"] == "read" and "cannot read" in missing["reason"]


def test_cli_rejects_wrong_input_or_output_in_one_line_before_work(tmp_path, capsys):
    from facediffuser.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "no such directory"),
        (["--input", str(a_file), "--output", str(tmp_path / "o")], "is a file"),
        (["--input", str(images), "--output", str(a_file)], "is an existing file"),
        (["--input", str(tmp_path / "o"), "--output", str(tmp_path / "o2")], "no such directory"),
        (["--input", str(images), "--output", str(tmp_path / "o"), "--captioner", str(tmp_path / "nomodel")],
         "--captioner"),
        (["--input", str(images), "--output", str(tmp_path / "o"), "--max-subjects", "0"], "--max-subjects"),
        (["--input", "http://example.com/x", "--output", str(tmp_path / "o")], "only local paths and s3://"),
    ]
    for arguments, message in cases:
        assert main(["preprocess", *arguments]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("facediffuser preprocess: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()  # nothing was written

    # `python -m pipelines.preprocess` (what `ray job submit` runs) shares the parser and the errors
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", str(tmp_path / "missing"),
                             "--output", str(tmp_path / "o")], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("facediffuser preprocess: error: --input")


@pytest.mark.slow
def test_model_captioner_loads_from_a_directory(tmp_path, astronaut):
    """A tiny random BLIP saved to disk (no downloads): the path the real BLIP takes, end to end."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    from facediffuser.data.captions import check_captioner, make_captioner

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "man", "woman", "beach"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}))
    layers = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, hidden_size=32)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), encoder_hidden_size=32, bos_token_id=2,
                                         sep_token_id=3, pad_token_id=0, eos_token_id=3, **layers),
                        vision_config=dict(image_size=32, patch_size=8, projection_dim=32, **layers), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")

    check_captioner(str(tmp_path / "blip"))
    captioner = make_captioner(str(tmp_path / "blip"))
    with torch.no_grad():  # make the loaded random decoder say "man" every time, so the caption is known
        captioner.model.text_decoder.cls.predictions.decoder.bias[vocab.index("man")] = 1e4
    item = {**stages.new_item("a.jpg", "a.jpg"), "image": stages.encode_jpeg(Image.fromarray(astronaut)),
            "subjects": [{"face_box": [0, 0, 1, 1], "score": 1.0}]}
    captioned = stages.caption_stage(item, captioner)
    words = captioned["caption"].split()
    assert words and set(words) == {"man"}
    linked = stages.link_stage(captioned)  # "man man man …" names more people than the one face
    assert linked["stage"] == "link" and f"{len(words)} person nouns" in linked["reason"]
    kept = stages.caption_stage({**item, "caption": "a woman"}, captioner)
    assert kept["caption"] == "a woman"  # existing captions are kept
