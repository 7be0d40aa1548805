"""The released checkpoints and an SD1.5 directory from the hub load as their environments wrote them
(tests/official_env.py says what that means on disk), into the pipeline, `import-official` and training."""

from __future__ import annotations

import pytest
import torch
from official_env import official_state_dict, write_checkpoint, write_hub_sd15
from PIL import Image

from facediffuser.cli import main as cli_main
from facediffuser.models.tiny import tiny_pipeline
from facediffuser.pipeline import FaceDiffuserPipeline
from facediffuser.training.checkpoint import load_components

FAST = dict(num_inference_steps=4, height=64, width=64)


@pytest.fixture(scope="module")
def source():
    return tiny_pipeline(seed=7)  # plays the released SDM/TDM


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_pipeline(seed=8)  # plays SD1.5: its VAE, text encoder and tokenizer must be the ones used


@pytest.fixture(scope="module")
def hub_base(tmp_path_factory, base_pipe):
    return write_hub_sd15(tmp_path_factory.mktemp("hub") / "sd15", base_pipe)


def vision(pipe) -> dict:
    return dict(pipe.subject_encoder.config.vision_config)


def assert_same_weights(module, reference, cast=None):
    own = module.state_dict()
    for key, value in reference.state_dict().items():
        expected = value if cast is None else value.to(cast).float()
        assert torch.equal(own[key].float(), expected.float()), key


@pytest.mark.parametrize(
    "suffix, dtype", [(".bin", None), (".safetensors", None), (".bin", torch.float16), (".safetensors", torch.bfloat16)]
)
def test_released_checkpoints_load_as_the_official_environment_wrote_them(
    tmp_path, source, base_pipe, hub_base, astronaut, suffix, dtype
):
    """Trained parts fp32, frozen ones bf16, CLIP position ids as persistent buffers, old VAE names, the whole
    training wrapper in the file; or the same converted to safetensors and/or fp16/bf16."""
    sdm = write_checkpoint(official_state_dict(source, "sdm", dtype=dtype), tmp_path / f"sdm{suffix}")
    tdm = write_checkpoint(official_state_dict(source, "tdm", dtype=dtype), tmp_path / f"tdm{suffix}")
    imported = FaceDiffuserPipeline.from_official_checkpoints(hub_base, sdm, tdm, vision_config=vision(source))
    assert_same_weights(imported.sdm_unet, source.sdm_unet, cast=dtype)
    assert_same_weights(imported.tdm_unet, source.tdm_unet, cast=dtype)
    assert_same_weights(imported.subject_encoder, source.subject_encoder, cast=dtype)
    assert_same_weights(imported.text_encoder, base_pipe.text_encoder)  # the base's, not the checkpoint's
    assert_same_weights(imported.vae, base_pipe.vae)
    assert all(p.dtype == torch.float32 for p in imported.sdm_unet.parameters())
    imported.set_progress_bar_config(disable=True)
    assert imported("a man <|image|>", [astronaut], seed=1, **FAST).images[0].size == (64, 64)


def test_checkpoint_directories_and_half_precision_loading(tmp_path, source, hub_base):
    """A checkpoint given as its accelerate folder (pytorch_model.bin inside); the pipeline built in fp16."""
    for which in ("sdm", "tdm"):
        write_checkpoint(official_state_dict(source, which), tmp_path / which / "pytorch_model.bin")
    imported = FaceDiffuserPipeline.from_official_checkpoints(
        hub_base, tmp_path / "sdm", tmp_path / "tdm", vision_config=vision(source), torch_dtype=torch.float16
    )
    assert {p.dtype for p in imported.sdm_unet.parameters()} == {torch.float16}
    assert {p.dtype for p in imported.subject_encoder.parameters()} == {torch.float16}
    assert_same_weights(imported.tdm_unet, source.tdm_unet, cast=torch.float16)


class NotATensor:
    """An arbitrary class in a checkpoint: weights_only loading must refuse to unpickle it."""


def test_other_architectures_and_unsafe_files_are_refused(tmp_path, source, hub_base):
    good = write_checkpoint(official_state_dict(source, "tdm"), tmp_path / "good.bin")
    sdm = write_checkpoint(official_state_dict(source, "sdm"), tmp_path / "sdm.bin")

    def load(sdm_path, tdm_path=good, config=None):
        return FaceDiffuserPipeline.from_official_checkpoints(
            hub_base, sdm_path, tdm_path, vision_config=config or vision(source)
        )

    torch.save({"unet.x": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load(tmp_path / "evil.bin")
    torch.save({"unet.conv_in.weight": torch.zeros(1)}, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="has no 'image_encoder.\\*' weights"):
        load(tmp_path / "partial.bin")
    # a wider UNet (another architecture): the shapes name it
    wider = tiny_pipeline(seed=7, unet_width=64)
    write_checkpoint(official_state_dict(wider, "tdm"), tmp_path / "wider.bin")
    with pytest.raises(ValueError, match="tdm unet: .* has shape"):
        load(sdm, tmp_path / "wider.bin")
    # a vision tower of another input size: its legacy position ids do not fit this architecture
    other = dict(vision(source), image_size=48)
    with pytest.raises(ValueError, match="sdm subject encoder: checkpoint does not match the architecture"):
        load(sdm, config=other)
    # position ids that are not what the buffer holds, and an unknown extra key, are both refused
    state = official_state_dict(source, "sdm")
    state["image_encoder.vision_model.embeddings.position_ids"] = state[
        "image_encoder.vision_model.embeddings.position_ids"
    ].flip(-1)
    with pytest.raises(ValueError, match="position_ids"):
        load(write_checkpoint(state, tmp_path / "shuffled.bin"))
    state = official_state_dict(source, "sdm")
    state["image_encoder.vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 unexpected"):
        load(write_checkpoint(state, tmp_path / "extra.safetensors"))
    state = official_state_dict(source, "sdm")
    state["postfuse_module.layer_norm.weight"] = state["postfuse_module.layer_norm.weight"].long()
    with pytest.raises(ValueError, match="is torch.int64, expected float32, float16 or bfloat16"):
        load(write_checkpoint(state, tmp_path / "ints.bin"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load(tmp_path / "nope.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor pytorch_model.bin"):
        load(tmp_path / "empty")


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_hub_sd15_directories_as_base(tmp_path, source, base_pipe, weights):
    """model_index.json, safety_checker/ and feature_extractor/ beside; .bin or .safetensors; fp16 variant files
    read with variant="fp16", and a clear error that names the variant when it is missing."""
    sdm = write_checkpoint(official_state_dict(source, "sdm"), tmp_path / "sdm.bin")
    tdm = write_checkpoint(official_state_dict(source, "tdm"), tmp_path / "tdm.bin")
    only_fp16 = write_hub_sd15(tmp_path / "fp16", base_pipe, weights=weights, plain=False, fp16_variant=True)
    imported = FaceDiffuserPipeline.from_official_checkpoints(
        only_fp16, sdm, tdm, vision_config=vision(source), variant="fp16"
    )
    assert_same_weights(imported.text_encoder, base_pipe.text_encoder, cast=torch.float16)
    assert_same_weights(imported.vae, base_pipe.vae, cast=torch.float16)
    assert {p.dtype for p in imported.vae.parameters()} == {torch.float32}
    # training reads the same base into fp32 master weights
    parts = load_components(only_fp16, "tdm", variant="fp16")
    assert {p.dtype for p in parts["unet"].parameters()} == {torch.float32}
    assert_same_weights(parts["unet"], base_pipe.tdm_unet, cast=torch.float16)
    assert parts["tokenizer"]("a man").input_ids == base_pipe.tokenizer("a man").input_ids
    with pytest.raises(FileNotFoundError, match="no plain weights .*pass --variant fp16"):
        load_components(only_fp16, "sdm", log=lambda m: None)
    both = write_hub_sd15(tmp_path / "both", base_pipe, weights=weights, fp16_variant=True)
    parts = load_components(both, "tdm")
    assert_same_weights(parts["unet"], base_pipe.tdm_unet)  # the plain fp32 files, exactly
    assert_same_weights(parts["vae"], base_pipe.vae)
    with pytest.raises(FileNotFoundError, match="no bf16 weights"):
        load_components(both, "tdm", variant="bf16")


def test_import_official_command_writes_a_model_directory(tmp_path, capsys, source, hub_base, astronaut):
    sdm = write_checkpoint(official_state_dict(source, "sdm"), tmp_path / "sdm.bin")
    tdm = write_checkpoint(official_state_dict(source, "tdm"), tmp_path / "tdm.safetensors")
    # the default vision tower is ViT-L/14, which does not fit a tiny base's text width: refused, saying why
    assert (
        cli_main(
            [
                "import-official",
                "--base",
                str(hub_base),
                "--sdm",
                str(sdm),
                "--tdm",
                str(tdm),
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 2
    )
    assert "error: CLIP projection_dim 768 must equal the text width 32" in capsys.readouterr().err
    for args, message in [
        (["--sdm", str(tmp_path / "missing.bin"), "--tdm", str(tdm)], "--sdm: checkpoint not found"),
        (["--sdm", str(sdm), "--tdm", str(tdm), "--variant", "fp16"], "no fp16 weights"),
    ]:
        assert cli_main(["import-official", "--base", str(hub_base), *args, "--out", str(tmp_path / "m2")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # generate refuses a Stable Diffusion directory as --model, saying what to do with it
    Image.fromarray(astronaut).save(tmp_path / "face.png")
    assert (
        cli_main(
            [
                "generate",
                "--model",
                str(hub_base),
                "--prompt",
                "a man <|image|>",
                "--reference",
                str(tmp_path / "face.png"),
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "is a Stable Diffusion directory" in capsys.readouterr().err


def test_import_official_round_trip_through_generate(tmp_path, monkeypatch, source, hub_base, astronaut):
    """The command's output is a model directory `generate --model` uses, with the imported weights."""
    import facediffuser.official as official

    sdm = write_checkpoint(official_state_dict(source, "sdm"), tmp_path / "sdm.bin")
    tdm = write_checkpoint(official_state_dict(source, "tdm"), tmp_path / "tdm.bin")
    monkeypatch.setattr(official, "CLIP_VIT_L14", vision(source))  # tiny vision tower in place of ViT-L/14
    out = tmp_path / "model"
    assert (
        cli_main(["import-official", "--base", str(hub_base), "--sdm", str(sdm), "--tdm", str(tdm), "--out", str(out)])
        == 0
    )
    loaded = FaceDiffuserPipeline.from_sdm_and_tdm(out / "sdm", out / "tdm")
    assert_same_weights(loaded.sdm_unet, source.sdm_unet)
    assert_same_weights(loaded.subject_encoder, source.subject_encoder)
    assert not list(out.rglob("*.bin")), "the imported model is written in safetensors"
    photo = tmp_path / "face.png"
    Image.fromarray(astronaut).save(photo)
    assert (
        cli_main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "a man <|image|> on the moon",
                "--reference",
                str(photo),
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    assert (tmp_path / "g" / "image_0.png").is_file()
