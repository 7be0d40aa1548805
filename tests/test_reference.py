"""facediffuser.reference: the one function from a reference photo to the subject encoder's input, in its three
modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facediffuser import reference
from facediffuser.images import load_image, pad_to_square, pil_to_tensor

ASTRONAUT = str(Path(reference.__file__).parent / "assets" / "astronaut.jpg")


def official_transform(photo) -> torch.Tensor:
    """METHOD.md §1, written out: pad square with black, bilinear antialiased resize to 224."""
    square = pad_to_square(pil_to_tensor(load_image(photo)))
    return torch.nn.functional.interpolate(
        square[None], size=(224, 224), mode="bilinear", align_corners=False, antialias=True
    )[0]


def test_whole_is_the_default_and_the_official_transform_without_any_detector(monkeypatch):
    def no_detector(*args, **kwargs):
        raise AssertionError("mode whole must not load a face detector")

    monkeypatch.setattr("facediffuser.data.faces.make_detector", no_detector)
    monkeypatch.setattr(reference, "_shared", {})
    tensor = reference.reference_tensor(ASTRONAUT)
    assert torch.equal(tensor, official_transform(ASTRONAUT)) and tensor.shape == (3, 224, 224)
    assert torch.equal(reference.reference_tensor(ASTRONAUT, "whole"), tensor)
    assert reference._shared == {}


def test_face_and_person_crop_the_subject_and_are_deterministic():
    whole = reference.reference_tensor(ASTRONAUT, "whole")
    face = reference.reference_tensor(ASTRONAUT, "face")
    person = reference.reference_tensor(ASTRONAUT, "person")
    assert face.shape == person.shape == (3, 224, 224)
    assert not torch.equal(face, whole) and not torch.equal(person, whole) and not torch.equal(face, person)
    assert torch.equal(reference.reference_tensor(ASTRONAUT, "person"), person)  # the noise background is seeded
    assert 0 <= float(person.min()) and float(person.max()) <= 1
    # the detector and the segmenter were built once and are kept for the process
    assert {"detector:mediapipe", "segmenter"} <= set(reference._shared)


def test_a_photo_without_a_face_is_a_clear_error_naming_it(tmp_path):
    noise = tmp_path / "noise.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((160, 160, 3)) * 255).astype(np.uint8)).save(noise)
    for mode in ("face", "person"):
        with pytest.raises(
            reference.SubjectNotFound, match=f"noise.png: no face found.*reference mode {mode}"
        ) as caught:
            reference.reference_tensor(str(noise), mode)
        assert caught.value.code == "no_face_found" and isinstance(caught.value, ValueError)
    assert reference.reference_tensor(str(noise), "whole").shape == (3, 224, 224)  # the whole photo needs no face
    with pytest.raises(ValueError, match="unknown reference mode 'head'; choose one of whole, face, person"):
        reference.reference_tensor(ASTRONAUT, "head")


def test_pipeline_errors_name_the_reference_and_the_photo(tiny_pipe, tmp_path):
    from PIL import Image

    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(1).random((160, 160, 3)) * 255).astype(np.uint8)).save(noise)
    with pytest.raises(ValueError, match="reference 2: .*noise.png: no face found"):
        tiny_pipe.encode_references([ASTRONAUT, str(noise)], "face")
    with pytest.raises(ValueError, match="unknown reference mode"):
        tiny_pipe("a man <|image|>", [ASTRONAUT], num_inference_steps=2, reference_mode="hair")


def test_the_embedding_does_not_depend_on_torchs_thread_count(tiny_pipe):
    """A CLI uses every core, a Serve replica its own thread count: the same photo must still give the same bits."""
    threads = torch.get_num_threads()
    try:
        hashes = set()
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            hashes.add(reference.embedding_sha256(tiny_pipe.encode_references([ASTRONAUT])[0]))
    finally:
        torch.set_num_threads(threads)
    assert len(hashes) == 1
