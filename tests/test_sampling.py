"""The SNF sampler: mask maths, the official numerics, degenerate windows, batch independence, shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from torchvision.transforms import Resize

from facediffuser.models.tiny import SD15_SCHEDULE, tiny_unet
from facediffuser.sampling import FusionOptions, boundaries_from_fractions, snf_denoise, snf_mask
from facediffuser.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    return tiny_unet().eval(), tiny_unet().eval()


def embeds(batch, seed=1, dim=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 77, dim, generator=g) for _ in range(3)]


# ---------------------------------------------------------------- the mask
def test_mask_picks_the_model_with_the_stronger_local_response():
    tdm = torch.zeros(1, 4, 16, 16)
    sdm = torch.zeros(1, 4, 16, 16)
    tdm[..., :, :6] = 3.0  # TDM responds strongly on the left
    sdm[..., :, 10:] = 3.0  # SDM on the right
    mask = snf_mask(tdm, sdm)
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.float32
    assert mask[0, 0, :, 12:].eq(1).all(), "SDM must win where only it responds"
    assert mask[0, 0, :, :4].eq(0).all(), "TDM must win where only it responds"
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_ties_go_to_the_tdm():
    same = torch.randn(2, 4, 8, 8)
    assert snf_mask(same, same.clone()).eq(0).all()
    assert snf_mask(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)).eq(0).all()


def test_mask_is_per_sample():
    a, b = torch.randn(3, 4, 12, 12), torch.randn(3, 4, 12, 12)
    together = snf_mask(a, b)
    for i in range(3):
        assert torch.equal(together[i], snf_mask(a[i : i + 1], b[i : i + 1])[0])
    # scaling one sample's responses must not change another sample's mask
    a2 = a.clone()
    a2[0] *= 50
    assert torch.equal(snf_mask(a2, b)[1:], together[1:])


def test_mask_matches_official_recipe_at_64(tmp_path):
    """Independent re-statement of METHOD.md §5 at 64×64: AvgPool2d(4,1,1) → Resize(64) → channel mean →
    softmax over 4096 → argmax over [TDM, SDM]."""
    torch.manual_seed(3)
    w = 5.0
    tdm_dir, sdm_dir = w * torch.randn(2, 4, 64, 64), w * torch.randn(2, 4, 64, 64)
    pool, resize = torch.nn.AvgPool2d(4, 1, 1), Resize(64)
    expected = []
    for i in range(2):
        maps = []
        for response in (tdm_dir[i].abs(), sdm_dir[i].abs()):
            smooth = resize(pool(response[None]))[0].mean(0)
            maps.append(torch.softmax(smooth.reshape(-1), 0).reshape(64, 64))
        expected.append(torch.stack(maps).argmax(0).float())
    assert torch.equal(snf_mask(tdm_dir, sdm_dir)[:, 0], torch.stack(expected))


def test_saliency_is_fp32_for_half_inputs():
    tdm, sdm = torch.randn(1, 4, 16, 16).half(), torch.randn(1, 4, 16, 16).half()
    mask = snf_mask(tdm, sdm)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, snf_mask(tdm.float(), sdm.float()))


def test_non_default_options_change_the_mask_only_when_asked():
    torch.manual_seed(4)
    tdm, sdm = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    soft = snf_mask(tdm, sdm, FusionOptions(soft=True))
    assert ((soft > 0) & (soft < 1)).any()
    assert torch.equal(snf_mask(tdm, sdm, FusionOptions()), snf_mask(tdm, sdm))
    with pytest.raises(ValueError, match="fusion mode"):
        FusionOptions(mode="max")


# ---------------------------------------------------------------- the loop vs independent loops
@torch.no_grad()
def official_style_loop(tdm, sdm, scheduler, latents, null, text, aug, steps, w, s, f):
    """The official loop as METHOD.md §5 describes it, hard-wired to 64×64 latents (independent of our code)."""
    scheduler.set_timesteps(steps)
    pool, resize = torch.nn.AvgPool2d(4, 1, 1), Resize(64)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        if i <= s:
            u, c = tdm(x, t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            eps = u + w * (c - u)
        elif i <= f:
            u, c = tdm(x, t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            su, sc = sdm(x, t, encoder_hidden_states=torch.cat([text, aug])).sample.chunk(2)
            eps_g, eps_e = u + w * (c - u), su + w * (sc - su)
            fused = []
            for b in range(latents.shape[0]):
                maps = []
                for r in ((w * (c[b] - u[b])).abs(), (w * (sc[b] - su[b])).abs()):
                    sm = resize(pool(r.reshape(-1, 4, 64, 64)))[0].mean(0)
                    maps.append(torch.softmax(sm.reshape(-1), 0).reshape(64, 64))
                m = torch.stack(maps).argmax(0).float()[None]
                fused.append(m * eps_e[b] + (1 - m) * eps_g[b])
            eps = torch.stack(fused)
        else:
            su, sc = sdm(x, t, encoder_hidden_states=torch.cat([text, aug])).sample.chunk(2)
            eps = su + w * (sc - su)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def plain_cfg_loop(unet, scheduler, latents, uncond, cond, steps, w):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        u = unet(x, t, encoder_hidden_states=uncond).sample
        c = unet(x, t, encoder_hidden_states=cond).sample
        latents = scheduler.step(u + w * (c - u), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, DDIMScheduler])
def test_default_mode_reproduces_the_official_loop(unets, scheduler_cls):
    tdm, sdm = unets
    null, text, aug = embeds(1)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    kwargs = dict(skip_prk_steps=True) if scheduler_cls is PNDMScheduler else {}
    steps, w, s, f = 5, 5.0, 1, 3  # every stage runs: scene 0-1, fusion 2-3, subjects 4
    ours = snf_denoise(
        tdm,
        sdm,
        scheduler_cls.from_config(SD15_SCHEDULE, **kwargs),
        latents,
        null,
        text,
        aug,
        num_inference_steps=steps,
        guidance_scale=w,
        start_merge_step=s,
        final_step=f,
        return_masks=True,
    )
    reference = official_style_loop(
        tdm, sdm, scheduler_cls.from_config(SD15_SCHEDULE, **kwargs), latents, null, text, aug, steps, w, s, f
    )
    assert (ours.latents - reference).abs().max().item() < 1e-4
    assert ours.fusion_steps == list(range(s + 1, f + 1))
    assert len(ours.masks) == f - s
    assert any(0 < m.mean() < 1 for m in ours.masks), "both models should win somewhere"


def test_no_scene_stage_and_no_fusion_is_plain_cfg_of_the_sdm(unets):
    tdm, sdm = unets
    null, text, aug = embeds(2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    ours = snf_denoise(
        tdm,
        sdm,
        DDIMScheduler(**SD15_SCHEDULE),
        latents,
        null,
        text,
        aug,
        num_inference_steps=6,
        guidance_scale=5.0,
        start_merge_step=-1,
        final_step=-1,
        return_masks=True,
    )
    plain = plain_cfg_loop(sdm, DDIMScheduler(**SD15_SCHEDULE), latents, text, aug, 6, 5.0)
    assert torch.allclose(ours.latents, plain, rtol=1e-4, atol=1e-4)
    assert ours.masks == []


def test_all_tdm_is_plain_cfg_of_the_tdm(unets):
    tdm, sdm = unets
    null, text, aug = embeds(2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ours = snf_denoise(
        tdm,
        sdm,
        DDIMScheduler(**SD15_SCHEDULE),
        latents,
        null,
        text,
        aug,
        num_inference_steps=6,
        guidance_scale=5.0,
        start_merge_step=5,
        final_step=5,
    )
    plain = plain_cfg_loop(tdm, DDIMScheduler(**SD15_SCHEDULE), latents, null, text, 6, 5.0)
    assert torch.allclose(ours.latents, plain, rtol=1e-4, atol=1e-4)
    # and it is not accidentally the SDM
    sdm_only = plain_cfg_loop(sdm, DDIMScheduler(**SD15_SCHEDULE), latents, text, aug, 6, 5.0)
    assert not torch.allclose(ours.latents, sdm_only, atol=1e-3)


def test_batch_members_are_independent(unets):
    tdm, sdm = unets
    null, text, aug = embeds(3, seed=8)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    run = dict(num_inference_steps=6, guidance_scale=5.0, start_merge_step=1, final_step=4, return_masks=True)
    batched = snf_denoise(tdm, sdm, DDIMScheduler(**SD15_SCHEDULE), latents, null, text, aug, **run)
    for i in range(3):
        alone = snf_denoise(
            tdm,
            sdm,
            DDIMScheduler(**SD15_SCHEDULE),
            latents[i : i + 1],
            null[i : i + 1],
            text[i : i + 1],
            aug[i : i + 1],
            **run,
        )
        assert torch.allclose(batched.latents[i], alone.latents[0], rtol=1e-4, atol=1e-4)
        for m_batch, m_alone in zip(batched.masks, alone.masks):
            assert torch.equal(m_batch[i], m_alone[0])


@pytest.mark.parametrize("shape", [(10, 14), (16, 24), (9, 9)])
def test_non_square_and_non_64_latents(unets, shape):
    tdm, sdm = unets
    null, text, aug = embeds(1)
    latents = torch.randn(1, 4, *shape)
    out = snf_denoise(
        tdm,
        sdm,
        DPMSolverMultistepScheduler.from_config(SD15_SCHEDULE),
        latents,
        null,
        text,
        aug,
        num_inference_steps=5,
        guidance_scale=3.0,
        start_merge_step=0,
        final_step=3,
        return_masks=True,
    )
    assert out.latents.shape == latents.shape and torch.isfinite(out.latents).all()
    assert all(m.shape == (1, 1, *shape) for m in out.masks)


def test_average_fusion_is_the_mean_of_the_two_guided_noises(unets):
    tdm, sdm = unets
    null, text, aug = embeds(1)
    latents = torch.randn(1, 4, 16, 16)
    avg = snf_denoise(
        tdm,
        sdm,
        DDIMScheduler(**SD15_SCHEDULE),
        latents,
        null,
        text,
        aug,
        num_inference_steps=4,
        guidance_scale=5.0,
        start_merge_step=-1,
        final_step=3,
        fusion=FusionOptions(mode="average"),
    )
    # by hand: one step each, ε = (ε_tdm + ε_sdm)/2 at every iteration
    sched = DDIMScheduler(**SD15_SCHEDULE)
    sched.set_timesteps(4)
    x = latents
    with torch.no_grad():
        for t in sched.timesteps:
            u, c = tdm(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            su, sc = sdm(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([text, aug])).sample.chunk(2)
            x = sched.step(0.5 * (u + 5 * (c - u)) + 0.5 * (su + 5 * (sc - su)), t, x).prev_sample
    assert torch.allclose(avg.latents, x, rtol=1e-4, atol=1e-4)


def test_stage1_computes_no_saliency_and_calls_each_unet_once_per_step(unets, monkeypatch):
    import facediffuser.sampling as sampling

    tdm, sdm = unets
    calls = {"tdm": 0, "sdm": 0, "mask": 0}

    def counting(unet, name):
        def call(*args, **kwargs):
            calls[name] += 1
            return unet(*args, **kwargs)

        return call

    real_mask = sampling.snf_mask
    monkeypatch.setattr(
        sampling, "snf_mask", lambda *a, **k: (calls.__setitem__("mask", calls["mask"] + 1), real_mask(*a, **k))[1]
    )
    null, text, aug = embeds(1)
    snf_denoise(
        counting(tdm, "tdm"),
        counting(sdm, "sdm"),
        DDIMScheduler(**SD15_SCHEDULE),
        torch.randn(1, 4, 8, 8),
        null,
        text,
        aug,
        num_inference_steps=10,
        guidance_scale=5.0,
        start_merge_step=3,
        final_step=6,
    )
    assert calls == {"tdm": 7, "sdm": 6, "mask": 3}  # N + (f - s) UNet calls: 2N + 2(f - s) evaluations


# ---------------------------------------------------------------- boundaries
def test_boundary_validation(unets):
    tdm, sdm = unets
    null, text, aug = embeds(1)
    base = dict(num_inference_steps=5, guidance_scale=5.0)
    for s, f, message in [(-2, 2, "start_merge_step"), (1, 5, "final_step"), (3, 2, "before")]:
        with pytest.raises(ValueError, match=message):
            snf_denoise(
                tdm,
                sdm,
                DDIMScheduler(**SD15_SCHEDULE),
                torch.randn(1, 4, 8, 8),
                null,
                text,
                aug,
                start_merge_step=s,
                final_step=f,
                **base,
            )
    with pytest.raises(ValueError, match="batch size"):
        snf_denoise(
            tdm,
            sdm,
            DDIMScheduler(**SD15_SCHEDULE),
            torch.randn(2, 4, 8, 8),
            null,
            text,
            aug,
            start_merge_step=1,
            final_step=2,
            **base,
        )


def test_fractions_give_the_official_indices():
    assert boundaries_from_fractions(0.3, 0.6, 50) == (15, 30)
    assert boundaries_from_fractions(0.0, 1.0, 20) == (0, 19)
    with pytest.raises(ValueError, match="alpha"):
        boundaries_from_fractions(0.7, 0.6, 50)


# ---------------------------------------------------------------- dropping rows (cancellation) and progress
DROP = dict(num_inference_steps=6, guidance_scale=5.0, start_merge_step=0, final_step=3, return_masks=True)
# Dropping rows changes the UNets' batch size, which may change float rounding. Measured on the 2-core CPU (tiny
# UNets, 16×16 latents, |latents| up to ~55), kept rows against the same rows of the whole batch:
# - 1 torch thread: bit-identical for every scheduler (so the pruning itself is exact);
# - 2 threads: max |Δ| 4e-6 (DDIM, Euler, DDPM) to 1.5e-5 (DPM-Solver++), a few float32 ulps, since the kernels
#   split the work by batch size; but the hard fusion mask then flips at near-ties (4 of 43,008 pixel decisions,
#   DDIM, 12 seeds, 10 steps), and a flip early in the window can move that image further (once in 12 runs:
#   max |Δ| 1.6). Batched-vs-alone (test_batch_members_are_independent) has the same property.
# The tests run on one thread so that they measure the pruning, not the kernels; the bound covers other CPUs.
DROP_TOLERANCE = 1e-4


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recording(unet, sizes: list):
    """The UNet, noting the batch size of every call (to see a dropped row's work stop)."""

    def call(sample, *args, **kwargs):
        sizes.append(sample.shape[0])
        return unet(sample, *args, **kwargs)

    return call


def run_three(unets, name, keep_rows=..., regions=None, sizes=None):
    """A batch of 3, one seed and one generator per row (as the pipeline and the server make them)."""
    from facediffuser.pipeline import seeded_latents
    from facediffuser.schedulers import make_scheduler

    tdm, sdm = unets
    if sizes is not None:
        tdm, sdm = recording(tdm, sizes.setdefault("tdm", [])), recording(sdm, sizes.setdefault("sdm", []))
    scheduler = make_scheduler(name, SD15_SCHEDULE)
    latents, generators = seeded_latents((4, 16, 16), [11, 12, 13])
    null, text, aug = embeds(3, seed=10)
    extra = {} if keep_rows is ... else {"keep_rows": keep_rows}
    return snf_denoise(
        tdm,
        sdm,
        scheduler,
        latents * scheduler.init_noise_sigma,
        null,
        text,
        aug,
        generator=generators,
        regions=regions,
        **DROP,
        **extra,
    )


def drop_row_1_at_2(i):
    return [0, 2] if i == 2 else None


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_dropping_a_row_leaves_the_others_as_they_were(unets, name, one_thread):
    whole = run_three(unets, name)
    assert whole.rows == [0, 1, 2]
    assert torch.equal(run_three(unets, name, keep_rows=None).latents, whole.latents)  # bit for bit
    assert torch.equal(run_three(unets, name, keep_rows=lambda i: None).latents, whole.latents)
    assert torch.equal(run_three(unets, name, keep_rows=lambda i: [2, 1, 0]).latents, whole.latents)
    sizes = {}
    cut = run_three(unets, name, keep_rows=drop_row_1_at_2, sizes=sizes)
    assert cut.rows == [0, 2] and cut.latents.shape == (2, 4, 16, 16)
    assert (cut.latents - whole.latents[[0, 2]]).abs().max().item() < DROP_TOLERANCE
    # every mask, also the one made before the drop (iteration 1), has the surviving rows only
    assert len(cut.masks) == len(whole.masks) == 3
    for m_cut, m_whole in zip(cut.masks, whole.masks):
        assert m_cut.shape == (2, 1, 16, 16)
        assert torch.equal(m_cut, m_whole[[0, 2]])
    # the dropped row costs nothing from iteration 2 on: the CFG pair of 3 rows (6) becomes that of 2 (4)
    scheduler = SCHEDULERS[name][0].from_config(SD15_SCHEDULE, **SCHEDULERS[name][1])
    scheduler.set_timesteps(DROP["num_inference_steps"])
    iterations = len(scheduler.timesteps)  # PNDM runs one more than the steps
    assert sizes == {"tdm": [6, 6, 4, 4], "sdm": [6] + [4] * (iterations - 2)}


def test_dropping_rows_of_a_boxed_batch(unets, one_thread):
    from facediffuser.layout import SubjectRegions

    def regions():
        boxes = [[(0.0, 0.0, 0.5, 1.0)], [(0.5, 0.0, 1.0, 1.0)], [(0.2, 0.2, 0.8, 0.6)]]
        return SubjectRegions(tokens=[[3], [4], [5]], boxes=boxes, latent_size=(16, 16))

    whole = run_three(unets, "ddim", regions=regions())
    theirs = regions()
    # drop row 0 in the fusion window, then (of what is left, rows 1 and 2) row 2 in stage 3
    cut = run_three(unets, "ddim", keep_rows=lambda i: {2: [1, 2], 4: [0]}.get(i), regions=theirs)
    assert cut.rows == [1]
    assert (cut.latents - whole.latents[[1]]).abs().max().item() < DROP_TOLERANCE
    for m_cut, m_whole in zip(cut.masks, whole.masks):
        assert torch.equal(m_cut, m_whole[[1]])
        assert m_cut[0, 0, :, :8].eq(0).all(), "row 1's box is the right half: the SDM may not win on the left"
    assert theirs.tokens == [[3], [4], [5]] and len(theirs.boxes) == 3, "the caller's regions are left whole"


def test_dropping_every_row_stops_the_loop(unets):
    sizes, seen = {}, []
    out = run_three(unets, "dpm++", keep_rows=lambda i: seen.append(i) or ([] if i == 2 else None), sizes=sizes)
    assert out.rows == [] and out.latents.shape == (0, 4, 16, 16)
    assert seen == [0, 1, 2], "nothing is asked or run after the last row went"
    assert sizes == {"tdm": [6, 6], "sdm": [6]}
    assert [m.shape[0] for m in out.masks] == [0]


def test_bad_keep_rows_answers_and_unknown_scheduler_state(unets):
    for answer in ([0, 0], [3], [-1]):
        with pytest.raises(ValueError, match="distinct rows"):
            run_three(unets, "ddim", keep_rows=lambda i, a=answer: a)
    from facediffuser.batch_rows import prune_scheduler

    scheduler = DDIMScheduler(**SD15_SCHEDULE)
    scheduler.history = torch.zeros(3, 4, 8, 8)  # a solver's per-sample state we do not know how to slice
    with pytest.raises(ValueError, match="history"):
        prune_scheduler(scheduler, torch.tensor([0, 2]), 3)


def test_stage_of_matches_the_loop_and_on_step_reports_every_step(unets):
    from facediffuser.sampling import stage_of

    assert [stage_of(i, 1, 3) for i in range(6)] == ["scene"] * 2 + ["fusion"] * 2 + ["subjects"] * 2
    assert [stage_of(i, -1, -1) for i in range(2)] == ["subjects"] * 2
    steps, calls = [], []
    tdm, sdm = unets
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    null, text, aug = embeds(3, seed=10)
    result = snf_denoise(
        tdm,
        sdm,
        DDIMScheduler(**SD15_SCHEDULE),
        latents,
        null,
        text,
        aug,
        **DROP,
        keep_rows=drop_row_1_at_2,
        callback=lambda i, n: calls.append((i, n)),
        on_step=lambda i, n, x, m: steps.append((i, n, x.clone(), m)),
    )
    assert calls == [(i, 6) for i in range(6)]
    assert [(i, n, x.shape[0]) for i, n, x, _ in steps] == [(0, 6, 3), (1, 6, 3)] + [(i, 6, 2) for i in range(2, 6)]
    fusion = [i for i, _, _, m in steps if m is not None]
    assert fusion == result.fusion_steps == [i for i in range(6) if stage_of(i, 0, 3) == "fusion"]
    assert torch.equal(steps[-1][2], result.latents)
    assert torch.equal(steps[3][3], result.masks[2])
