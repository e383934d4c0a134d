"""Texture by analogy (refsr_cli.analogy): the paste, the search, and what `upscale --ref` and `sample` make of it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, smooth_image, tiny_model, write_png
from refsr_cli import analogy
from refsr_cli.analogy import STRIDE, Matcher, Texture, bank_part, make_bank, paste
from refsr_cli.engine import Upscaler
from refsr_cli.options import EngineOptions
from test_cli import pngs, run


def textured_image(height, width, seed=0):
    """HxWx3 float in [0, 1] with detail at every scale (uniform noise over a smooth image)."""
    rng = np.random.default_rng(seed)
    return np.clip(smooth_image(height, width, seed) / 255 * 0.6 + rng.random((height, width, 3)) * 0.4, 0, 1) \
        .astype(np.float32)


def bank_of(image: np.ndarray, upscaler: Upscaler):
    return upscaler.reference_bank(image, "test reference")


def test_the_hann_window_sums_to_one_so_a_constant_residual_pastes_as_itself():
    # A bank whose residual is 0.25 everywhere: whatever each patch picks, the paste is 0.25 at every pixel,
    # at the image's borders too (half a patch of context beyond them), and over any region.
    sharp = torch.full((1, 3, 64, 64), 0.5)
    faithful = torch.rand(1, 3, 64, 64) * 0.1 + 0.25  # residual varies: make it constant below
    part = list(bank_part(sharp, faithful))
    part[3] = torch.full_like(part[3], 0.25)
    bank = make_bank([part], "constant")
    matcher = Matcher(torch.rand(1, 3, 37, 45))
    choice = matcher.choose(bank, seed=3, temperature=1.0)
    weight = torch.ones(len(choice))
    whole = paste(matcher, bank, choice, weight, 0, 37, 0, 45)
    assert whole.shape == (1, 3, 37, 45)
    assert torch.allclose(whole, torch.full_like(whole, 0.25), atol=1e-6)
    part_of_it = paste(matcher, bank, choice, weight, 9, 30, 17, 40)
    assert torch.allclose(part_of_it, whole[..., 9:30, 17:40], atol=1e-6)


def test_a_patch_finds_itself_and_pastes_its_own_residual():
    # The input's fidelity output is the bank's own A: every interior patch's nearest key is itself, so the paste
    # (weight 1) rebuilds A' - A there.
    torch.manual_seed(0)
    faithful = torch.rand(1, 3, 64, 64)
    sharp = (faithful + 0.1 * torch.randn(1, 3, 64, 64)).clamp(0, 1)
    bank = make_bank([bank_part(sharp, faithful)], "self")
    matcher = Matcher(faithful)
    choice = matcher.choose(bank, 0, 0.0)
    texture = paste(matcher, bank, choice, torch.ones(len(choice)), 0, 64, 0, 64)
    residual = bank.residual.view(1, 3, 64, 64)
    inner = (slice(None), slice(None), slice(STRIDE, 64 - STRIDE), slice(STRIDE, 64 - STRIDE))
    assert torch.allclose(texture[inner], residual[inner], atol=1e-5)


def test_seeds_choose_among_candidates_and_temperature_widens_the_choice():
    torch.manual_seed(1)
    faithful = torch.rand(1, 3, 96, 96)
    bank = make_bank([bank_part(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))], "random")
    matcher = Matcher(faithful)
    best = matcher.choose(bank, 0, 0.0)
    assert torch.equal(matcher.choose(bank, 5, 0.0), best)  # temperature 0: the nearest, whatever the seed
    a, b = matcher.choose(bank, 1, 1.0), matcher.choose(bank, 2, 1.0)
    assert torch.equal(a, matcher.choose(bank, 1, 1.0))  # reproducible
    assert (a != b).float().mean() > 0.5
    candidates = matcher.candidate_list(bank, analogy.CANDIDATES)
    assert all(int(k) in candidates[i, :analogy.CANDIDATES].tolist() for i, k in enumerate(a))
    wide = matcher.choose(bank, 1, 3.0)
    assert bool((~(candidates[:, :analogy.CANDIDATES] == wide[:, None]).any(1)).any())  # further down the list


def engine(scale=2, tile=256):
    return Upscaler(tiny_model(scale), "cpu", tile=tile, tile_pad=8)


def test_strength_zero_and_flat_inputs_give_the_faithful_output():
    up = engine()
    bank = bank_of(textured_image(96, 96), up)
    lr = textured_image(20, 24, seed=2)
    faithful, zero = up.upscale(lr, [None, Texture(bank, 0, 1.0, 0.0)])
    assert np.array_equal(faithful, zero)
    flat = np.full((20, 24, 3), 0.4, np.float32)
    faithful, textured = up.upscale(flat, [None, Texture(bank, 0, 1.0, 1.0)])
    assert np.array_equal(faithful, textured)  # no room for invented detail on a flat image


def test_texture_goes_where_the_input_has_detail_and_stays_consistent_with_it():
    up = engine()
    bank = bank_of(textured_image(128, 128, seed=3), up)
    lr = np.full((24, 48, 3), 0.5, np.float32)
    lr[:, 24:] = textured_image(24, 24, seed=4)  # the right half has detail, the left half none
    faithful, a, b = (o.astype(np.float32) for o in up.upscale(lr, [None, Texture(bank, 1, 1.0, 1.0),
                                                                     Texture(bank, 2, 1.0, 1.0)]))
    left, right = (slice(None), slice(0, 40)), (slice(None), slice(56, 96))
    moved = np.abs(a - faithful)
    assert moved[right].mean() > 4 * max(moved[left].mean(), 0.05)
    assert np.abs(a - b)[right].mean() > 1.0  # two seeds differ where the input leaves room
    # Back-projection: the bicubic downscale of every output is the input to within a grey level or two.
    from refsr_cli.model import downscale
    for out in (a, b):
        down = downscale(torch.from_numpy(out / 255).permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0).numpy()
        assert np.abs(down - lr).mean() < 2 / 255


def test_tiles_agree_with_the_untiled_output_within_one_grey_level():
    lr = textured_image(40, 36, seed=5)
    whole, tiled = engine(tile=256), engine(tile=16)
    ref = textured_image(96, 80, seed=6)
    outs = [up.upscale(lr, [Texture(bank_of(ref, up), 3, 1.0, 1.0)])[0].astype(int) for up in (whole, tiled)]
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_a_walk_turns_one_texture_into_the_other():
    up = engine()
    bank = bank_of(textured_image(96, 96, seed=7), up)
    lr = textured_image(20, 20, seed=8)
    a, b = Texture(bank, 1, 1.0), Texture(bank, 2, 1.0)
    ends = up.upscale(lr, [a, b])
    frames = up.upscale(lr, [Texture(bank, 1, 1.0, to=b, t=t) for t in (0.0, 0.5, 1.0)])
    assert np.array_equal(frames[0], ends[0]) and np.abs(frames[2].astype(int) - ends[1]).max() <= 1
    half = frames[1].astype(int)
    assert 0 < np.abs(half - ends[0]).mean() < np.abs(ends[1].astype(int) - ends[0]).mean()


# --- the commands ----------------------------------------------------------------------------------------------

def write_reference(path, image: np.ndarray, mode="RGB"):
    Image.fromarray((image * 255).round().astype(np.uint8)).convert(mode).save(path)
    return path


def test_upscale_ref_and_sample_by_analogy(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png", 24, 20)
    ref = write_reference(tmp_path / "paint.png", textured_image(96, 96, seed=9))
    common = ("--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert run("upscale", lr, *common).exit_code == 0
    result = run("upscale", lr, "--ref", ref, "--strength", 0.7, *common, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"].endswith("photo_x2_paint.png")
    result = run("sample", lr, "--n", 2, *common)
    assert result.exit_code == 0, result.output
    result = run("sample", lr, "--n", 2, "--ref", ref, *common)
    assert result.exit_code == 0, result.output
    assert pngs(tmp_path / "o") == ["photo_x2.png", "photo_x2_paint.png", "photo_x2_paint_s0.png",
                                    "photo_x2_paint_s1.png", "photo_x2_s0.png", "photo_x2_s1.png"]
    faithful = np.asarray(Image.open(tmp_path / "o" / "photo_x2.png"))
    for name in ("photo_x2_paint.png", "photo_x2_s0.png", "photo_x2_paint_s1.png"):
        assert not np.array_equal(np.asarray(Image.open(tmp_path / "o" / name)), faithful), name
    # The redo command of each says --strength when it is not the default, and --ref for sample --ref.
    info = run("info", tmp_path / "o" / "photo_x2_paint.png", tmp_path / "o" / "photo_x2_paint_s1.png", "--json")
    commands = [json.loads(line)["redo"] for line in info.stdout.splitlines()]
    assert "--strength 0.7" in commands[0] and "--ref" in commands[0]
    assert commands[1].startswith(f"refsr sample {lr} --n 1 --seed 1") and "--ref" in commands[1]


def test_sample_at_temperature_zero_is_the_faithful_output(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png", 24, 20)
    common = ("--scale", 2, "--weights", checkpoint)
    assert run("upscale", lr, *common, "-o", tmp_path / "a").exit_code == 0
    assert run("sample", lr, "--n", 1, "--temperature", 0, *common, "-o", tmp_path / "b").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "photo_x2.png")),
                          np.asarray(Image.open(tmp_path / "b" / "photo_x2_s0.png")))


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e9"])
def test_bad_strengths_are_one_line(tmp_path, checkpoint, value):
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--strength", value, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "--strength")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: write_reference(p, textured_image(6, 6)), "too small"),
    (lambda p: write_reference(p, np.full((64, 64, 3), 0.3, np.float32)), "flat"),
])
def test_references_that_give_no_texture_are_one_line(tmp_path, checkpoint, make, fragment):
    lr = write_png(tmp_path / "photo.png")
    ref = make(tmp_path / "ref.png")
    result = run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert fragment in result.stderr and "ref.png" in result.stderr and "Traceback" not in result.output
    assert pngs(tmp_path / "o") == []


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grey_transparent_and_16_bit_references_give_texture(tmp_path, checkpoint, mode):
    lr = write_png(tmp_path / "photo.png", 24, 20)
    image = textured_image(80, 80, seed=10)
    if mode == "I;16":
        ref = tmp_path / "ref.png"
        Image.fromarray((image.mean(2) * 65535).astype(np.uint16)).save(ref)
    else:
        ref = write_reference(tmp_path / "ref.png", image, mode)
    result = run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert pngs(tmp_path / "o") == ["photo_x2_ref.png"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong shape", "not finite"])
def test_a_damaged_or_missing_bank_is_one_line(tmp_path, checkpoint, monkeypatch, damage):
    from safetensors.torch import load_file, save_file
    from refsr_cli import checkpoint as weights
    shipped = weights.weights_dir() / analogy.TEXTURE_BANK.format(scale=2)
    folder = tmp_path / "weights"
    folder.mkdir()
    bank = folder / analogy.TEXTURE_BANK
    if damage == "truncated":
        bank.write_bytes(shipped.read_bytes()[:1000])
    elif damage != "missing":
        tensors = {k: v for k, v in load_file(str(shipped)).items() if k.startswith("x2.0.")}
        if damage == "wrong shape":
            tensors["x2.0.residual"] = tensors["x2.0.residual"][:, :5].contiguous()
        else:
            tensors["x2.0.cells"][0, 0] = float("nan")
        save_file(tensors, str(bank))
    from refsr_cli import engine as engine_module
    monkeypatch.setattr(engine_module, "TEXTURE_BANK", str(bank))  # absolute: weights_dir() / it is itself
    lr = write_png(tmp_path / "photo.png")
    result = run("sample", lr, "--n", 2, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "texture bank")
    assert pngs(tmp_path / "o") == []


def test_the_shipped_bank_holds_every_scale_within_its_budget():
    from refsr_cli.checkpoint import weights_dir
    paths = [weights_dir() / analogy.TEXTURE_BANK.format(scale=scale) for scale in (2, 4, 8)]
    assert sum(path.stat().st_size for path in paths) <= 32 * 2 ** 20
    for scale, path in zip((2, 4, 8), paths):
        assert path.stat().st_size <= 16 * 2 ** 20  # the most a file in this repository may be
        bank = analogy.load_bank(path, scale)
        assert len(bank.keys) > 10_000 and bank.residual.dtype == torch.int8
        assert torch.isfinite(bank.keys).all()


def test_the_python_api_gives_what_the_commands_give(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png", 24, 20)
    ref = write_reference(tmp_path / "paint.png", textured_image(96, 96, seed=11))
    up = Upscaler.from_weights(str(checkpoint), 2, EngineOptions(device="cpu"))
    image = np.asarray(Image.open(lr).convert("RGB"), np.float32) / 255
    bank = up.reference_bank(np.asarray(Image.open(ref).convert("RGB"), np.float32) / 255)
    painted, sample = up.upscale(image, [Texture(bank, strength=0.5), Texture(up.texture_bank(), seed=3,
                                                                               temperature=1.0)])
    common = ("--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert run("upscale", lr, "--ref", ref, "--strength", 0.5, *common).exit_code == 0
    assert run("sample", lr, "--n", 1, "--seed", 3, *common).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "photo_x2_paint.png")), painted)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "photo_x2_s3.png")), sample)


@pytest.mark.parametrize("command, flags, fragment", [
    ("sample", ("--seed", "18446744073709551615"), "--seed"),
    ("sample", ("--seed", str(2 ** 63 - 1), "--n", "2"), "seeds go up to"),
    ("sample", ("--temperature", "inf"), "--temperature"),
    ("sample", ("--temperature", "1e308"), "--temperature"),
    ("upscale", ("--temperature", "nan"), "--temperature"),
    ("walk", ("--seed", "1", "--seed", "2", "--temperature", "nan"), "--temperature"),
])
def test_numbers_that_are_not_numbers_are_one_line(tmp_path, checkpoint, command, flags, fragment):
    lr = write_png(tmp_path / "photo.png")
    result = run(command, lr, *flags, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, fragment)
    assert not (tmp_path / "o").exists()
