import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import smooth_image, tiny_model
from refsr_cli.engine import Latent, Upscaler, back_project
from refsr_cli.metrics import psnr


def upscaler(scale=2, **kw):
    return Upscaler(tiny_model(scale), "cpu", **kw)


def lr_image(h=20, w=24, seed=1):
    return smooth_image(h, w, seed).astype(np.float32) / 255


def test_same_seed_same_image_other_seed_other_image():
    up, lr = upscaler(), lr_image()
    a, b, c = up.upscale(lr, [up.prior_z(0), up.prior_z(0), up.prior_z(1)])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5


def test_prior_z_does_not_depend_on_the_generator_state():
    up = upscaler()
    first = up.prior_z(5)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(first.z, up.prior_z(5).z)


def test_texture_noise_follows_its_seed_and_is_cut_as_the_tiles_are():
    lr = lr_image(40, 44)
    whole, tiled = upscaler(tile=64), upscaler(tile=16, tile_pad=12)
    z = whole.prior_z(0).z
    a, b, c = whole.upscale(lr, [Latent(z, 5), Latent(z, 5), Latent(z, 6)])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5  # the same z, other grain
    tiles = tiled.upscale(lr, [Latent(z, 5)])[0]
    assert np.abs(tiles.astype(int) - a).max() <= 2  # a tile gets the noise of its place in the image


def test_a_walk_turns_one_seeds_grain_into_the_others():
    from refsr_cli.batch import Variant, walk_variants
    up, lr = upscaler(), lr_image()
    frames = walk_variants([Variant("s3", {"seed": 3}, up.prior_z(3)), Variant("s7", {"seed": 7}, up.prior_z(7))], 5,
                           True)
    outputs = up.upscale(lr, [frame.latent for frame in frames])
    ends = up.upscale(lr, [up.prior_z(3), up.prior_z(7)])
    assert np.abs(outputs[0].astype(int) - ends[0]).max() <= 1 and np.abs(outputs[-1].astype(int) - ends[1]).max() <= 1
    steps = [np.abs(a.astype(int) - b).mean() for a, b in zip(outputs, outputs[1:])]
    assert max(steps) < np.abs(ends[0].astype(int) - ends[1]).mean()  # no jump: each frame near the last


def test_different_references_give_different_images():
    up, lr = upscaler(), lr_image()
    z1, z2 = up.reference_z(lr_image(40, 40, seed=2)), up.reference_z(lr_image(40, 40, seed=3) ** 3)
    a, b = up.upscale(lr, [z1, z2])
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def test_temperature_zero_is_the_mean():
    up = upscaler()
    ref = lr_image(40, 40, seed=2)
    assert torch.equal(up.reference_z(ref, 0.0, seed=1).z, up.reference_z(ref, 0.0, seed=2).z)
    assert not torch.equal(up.reference_z(ref, 1.0, seed=1).z, up.reference_z(ref, 1.0, seed=2).z)
    assert up.prior_z(3, temperature=0.0).z is None  # the fidelity output: the trunk alone


def test_fidelity_output_is_the_trunk_alone():
    up = upscaler()
    lr = lr_image(12, 10, seed=4)
    fidelity, sample = up.upscale(lr, [None, up.prior_z(0, 1.0)])
    with torch.no_grad():
        trunk = up.model.trunk(torch.from_numpy(lr).permute(2, 0, 1)[None], up.scale)
    expected = back_project(trunk, torch.from_numpy(lr).permute(2, 0, 1)[None], up.scale, up.consistency_steps)
    expected = (expected[0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
    assert np.abs(fidelity.astype(int) - expected).max() <= 1
    assert np.abs(sample.astype(int) - fidelity).mean() > 0.5  # the texture branch adds something


def lr_psnr(sr_uint8, lr_float, scale):
    h, w = lr_float.shape[:2]
    down = np.asarray(Image.fromarray(sr_uint8).resize((w, h), Image.BICUBIC), dtype=np.float64) / 255
    return psnr(down, lr_float.astype(np.float64))


@pytest.mark.parametrize("scale", [2, 4])
def test_consistency_raises_lr_psnr(scale):
    lr, model = lr_image(), tiny_model(scale)
    z = [Latent(torch.zeros(1, 8))]
    plain = Upscaler(model, "cpu", consistency_steps=0).upscale(lr, z)[0]
    default = Upscaler(model, "cpu").upscale(lr, z)[0]
    more = Upscaler(model, "cpu", consistency_steps=5).upscale(lr, z)[0]
    before, after, further = (lr_psnr(image, lr, scale) for image in (plain, default, more))
    assert after > before + 3, (before, after)
    # This untrained network saturates up to a tenth of its pixels, which each clamp takes back; more rounds still
    # reach the NTIRE 2021 bar (the shipped weights pass it after one round: README).
    assert further > max(after, 45), (after, further)


@pytest.mark.parametrize("scale", [2, 8])
def test_back_projection_is_the_limit_of_the_classic_iteration(scale):
    """One round (closed form, at LR) lands where many classic HR steps sr += up(lr - down(sr)) go, for an image
    that stays inside [0, 1] so that the clamps do nothing."""
    from refsr_cli.engine import back_project
    from refsr_cli.model import downscale
    gen = torch.Generator().manual_seed(0)
    lr = 0.3 + 0.4 * torch.rand(1, 3, 11, 14, generator=gen)
    sr = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
    sr = sr + 0.02 * torch.randn(sr.shape, generator=gen)
    classic = sr.clone()
    for _ in range(40):
        classic = classic + F.interpolate(lr - downscale(classic, scale), scale_factor=scale, mode="bicubic",
                                          align_corners=False)
    assert 0 < classic.min() and classic.max() < 1
    assert torch.allclose(back_project(sr, lr, scale, 1), classic, atol=1e-4)
    assert torch.allclose(downscale(back_project(sr, lr, scale, 1), scale), lr, atol=1e-4)


def test_tiled_equals_untiled():
    lr, model = lr_image(37, 45), tiny_model(4)
    zs = [Latent(torch.zeros(1, 8)), Latent(torch.ones(1, 8))]
    whole = Upscaler(model, "cpu", tile=64, tile_pad=0).upscale(lr, zs)
    tiled_up = Upscaler(model, "cpu", tile=16, tile_pad=12)
    assert len(tiled_up.tiles(37, 45)) == 9
    tiled = tiled_up.upscale(lr, zs)
    for a, b in zip(whole, tiled):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    # Without context the seams show: the check above is not vacuous.
    seams = Upscaler(model, "cpu", tile=16, tile_pad=0).upscale(lr, zs)[0]
    assert np.abs(whole[0].astype(int) - seams.astype(int)).max() > 2


def test_lr_encoding_runs_once_for_many_z(monkeypatch):
    up, calls = upscaler(), []
    original = up.model.encode_lr
    monkeypatch.setattr(up.model, "encode_lr", lambda x: calls.append(1) or original(x))
    up.upscale(lr_image(), [up.prior_z(s) for s in range(5)])
    assert len(calls) == 1


def test_inference_runs_without_autograd(monkeypatch):
    up, modes = upscaler(), []
    original = up.model.decode
    monkeypatch.setattr(up.model, "decode", lambda *a, **k: modes.append(torch.is_inference_mode_enabled())
                        or original(*a, **k))
    with torch.enable_grad():
        out = up.upscale(lr_image(), [up.prior_z(0), up.prior_z(1)])
    assert modes and all(modes) and out[0].dtype == np.uint8


def test_gpu_out_of_memory_falls_back_to_smaller_tiles(monkeypatch, capsys):
    up, lr = upscaler(tile=64, tile_pad=4), lr_image(40, 40)
    expected = upscaler(tile=16, tile_pad=4).upscale(lr, [up.prior_z(0)])[0]
    original = up.model.encode_lr

    def small_memory(x):
        if x.shape[-1] > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(x)
    monkeypatch.setattr(up.model, "encode_lr", small_memory)
    result = up.upscale(lr, [up.prior_z(0)])[0]
    assert up.tile == 16
    assert "retrying with --tile 32" in capsys.readouterr().err
    assert np.array_equal(result, expected)  # the same as asking for 16-pixel tiles in the first place


def test_latents_decoded_together_equal_latents_decoded_one_by_one(monkeypatch):
    """sample --n N runs the texture branch once for a batch of latents: the same images as one at a time (within
    a grey level: a batch may sum in another order), the fidelity output among them included."""
    from refsr_cli import engine
    up, lr = upscaler(), lr_image()
    latents = [up.prior_z(0), None, up.prior_z(1), up.reference_z(lr_image(40, 40, seed=2))]
    together = up.upscale(lr, latents)
    monkeypatch.setattr(engine, "DECODE_PIXELS", 1)  # one latent per batch
    for a, b in zip(together, up.upscale(lr, latents)):
        assert np.abs(a.astype(int) - b).max() <= 1
