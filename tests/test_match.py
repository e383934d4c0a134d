"""`upscale --match`: correspondence with content-similar references (refsr_cli.match)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import tiny_model
from refsr_cli import match
from refsr_cli.cli import main
from refsr_cli.errors import RefsrError
from refsr_cli.evaluate import protocol_pair
from refsr_cli.engine import Latent, Upscaler
from refsr_cli.model import downscale, upsample


def texture(height, width, seed):
    """Random structure at a sixth of the resolution, which a 4x LR keeps, plus fainter detail at half the
    resolution, which it loses: what a photo's detail looks like to the matching."""
    rng = np.random.default_rng(seed)
    coarse, fine = ((rng.random((height // f, width // f, 3)) * 255).astype(np.uint8) for f in (6, 2))
    up = [np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC), dtype=np.float32) for a in (coarse, fine)]
    return Image.fromarray((0.7 * up[0] + 0.3 * up[1]).round().astype(np.uint8))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def scene():
    """HR 256 x 256 of a larger texture; a second view of it: shifted by (20, 36) pixels and turned 2 degrees."""
    world = texture(320, 320, seed=1)
    hr = world.crop((0, 0, 256, 256))
    view = world.crop((36, 20, 316, 300)).rotate(2, resample=Image.BICUBIC)
    return hr, view


def test_a_second_view_of_the_scene_brings_its_detail_where_it_overlaps(scene):
    hr, view = scene
    hr_t = as_tensor(hr)
    lr = downscale(hr_t, 4)
    transfer = match.correspond(lr, [match.prepare_reference(np.asarray(view, dtype=np.float32) / 255, 4)], 4)
    base = upsample(lr, 4).clamp(0, 1)
    out = transfer.blend(base, 0, 0)
    # Where the view shows the scene (away from its rotated corners), the transfer restores the detail.
    inner = (slice(None), slice(None), slice(48, 240), slice(64, 240))
    assert psnr(out[inner], hr_t[inner]) > psnr(base[inner], hr_t[inner]) + 2.5  # measured: +3.3 dB
    # The confidence says where: high over the overlap, low where the view does not reach (the top-left).
    assert transfer.confidence[12:60, 16:60].mean() > 0.7
    assert transfer.confidence[:3, :6].mean() < 0.3


def test_an_unrelated_reference_leaves_the_output_alone(scene):
    hr, _ = scene
    lr = downscale(as_tensor(hr), 4)
    unrelated = np.asarray(texture(280, 280, seed=7), dtype=np.float32) / 255
    transfer = match.correspond(lr, [match.prepare_reference(unrelated, 4)], 4)
    base = upsample(lr, 4).clamp(0, 1)
    assert transfer.confidence.mean() < 0.05
    assert (transfer.blend(base, 0, 0) - base).abs().mean() < 2e-3


def test_several_references_are_used_together(scene):
    """Two views that each show part of the scene: together they cover more than either."""
    hr, view = scene
    lr = downscale(as_tensor(hr), 4)
    world = texture(320, 320, seed=1)
    other = np.asarray(world.crop((0, 0, 120, 256)), dtype=np.float32) / 255  # the left strip, unmoved
    refs = [match.prepare_reference(np.asarray(view, dtype=np.float32) / 255, 4), match.prepare_reference(other, 4)]
    one, both = match.correspond(lr, refs[:1], 4), match.correspond(lr, refs, 4)
    assert both.confidence.mean() > one.confidence.mean() + 0.05
    assert both.confidence[20:60, 2:10].mean() > 0.7  # the strip the view lacks


def test_tiles_agree_with_the_untiled_output(scene):
    hr, view = scene
    lr = np.asarray(hr.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255
    model = tiny_model(4)
    transfer = match.correspond(torch.from_numpy(lr).permute(2, 0, 1)[None],
                                [match.prepare_reference(np.asarray(view, dtype=np.float32) / 255, 4)], 4)
    whole = Upscaler(model, "cpu", tile=64, tile_pad=0).upscale(lr, [None], transfer=transfer)[0]
    tiled = Upscaler(model, "cpu", tile=16, tile_pad=12).upscale(lr, [None], transfer=transfer)[0]
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    plain = Upscaler(model, "cpu", tile=64, tile_pad=0).upscale(lr, [Latent(None)])[0]
    assert np.abs(whole.astype(int) - plain.astype(int)).mean() > 2  # the transfer did something


def test_a_huge_reference_is_bounded_and_a_tiny_one_refused(monkeypatch):
    monkeypatch.setattr(match, "MAX_REFERENCE_PIXELS", 100 * 100)
    big = np.zeros((400, 300, 3), dtype=np.float32)
    ref = match.prepare_reference(big, 4)
    assert ref.shape[-2] * ref.shape[-1] <= 100 * 100 and ref.shape[-2] % 4 == 0 and ref.shape[-1] % 4 == 0
    with pytest.raises(RefsrError, match="at least 20 pixels"):
        match.prepare_reference(np.zeros((19, 100, 3), dtype=np.float32), 4)


def test_protocols_are_seeded_and_half_shares_no_pixel():
    photo = texture(120, 200, seed=3)
    a, b = protocol_pair(photo, "warp", 5)[1], protocol_pair(photo, "warp", 5)[1]
    assert a.size == photo.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(protocol_pair(photo, "warp", 6)[1]))
    image, ref = protocol_pair(photo, "half", 0)
    assert image.size == (100, 120) and ref.size == (100, 120)
    assert np.array_equal(np.concatenate([np.asarray(image), np.asarray(ref)], 1), np.asarray(photo))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_upscale_match_writes_one_output_and_its_map(tmp_path, scene):
    hr, view = scene
    hr.resize((64, 64), Image.BICUBIC).save(tmp_path / "lr.png")
    view.save(tmp_path / "view.png")
    texture(200, 200, seed=9).save(tmp_path / "other.png")
    from refsr_cli.checkpoint import save_model
    weights = tmp_path / "tiny-x4.safetensors"
    save_model(tiny_model(4), weights)
    result = run("upscale", tmp_path / "lr.png", "--ref", tmp_path / "view.png", "--ref", tmp_path / "other.png",
                 "--match", "--match-map", "--scale", 4, "--weights", weights, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["output"].split("/")[-1] for r in records] == ["lr_x4_match.png", "lr_x4_match_map.png"]
    assert records[1]["confidence"] > 0.3
    confidence_map = np.asarray(Image.open(tmp_path / "out" / "lr_x4_match_map.png"))
    assert confidence_map.shape == (256, 256)
    assert confidence_map[64:240, 160:240].mean() > 150 and confidence_map[:8, :16].mean() < 100
    # Its provenance redoes it.
    info = json.loads(run("info", tmp_path / "out" / "lr_x4_match.png", "--json").stdout)
    assert info["redo"].endswith("--match --match-map --scale 4 --weights " + str(weights))
    assert info["redo"] == json.loads(run("info", tmp_path / "out" / "lr_x4_match_map.png", "--json").stdout)["redo"]


@pytest.mark.parametrize("args, message", [
    (("--match",), "--match needs at least one --ref"),
    (("--match-map",), "--match-map needs --match"),
    (("--match", "--ref", "REF", "--temperature", "1"), "--match needs at least one --ref"),
])
def test_match_misuse_is_one_line_and_exit_2(tmp_path, checkpoint, args, message):
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    args = [str(tmp_path / "ref.png") if a == "REF" else a for a in args]
    result = run("upscale", tmp_path / "lr.png", *args, "--scale", 2, "--weights", checkpoint, "-o", tmp_path)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_a_reference_too_small_to_match_is_reported(tmp_path, checkpoint):
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    Image.fromarray(np.zeros((6, 60, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    result = run("upscale", tmp_path / "lr.png", "--ref", tmp_path / "ref.png", "--match", "--scale", 2,
                 "--weights", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "ref.png: too small to match at x2" in result.stderr


def test_eval_measures_match_under_a_protocol(tmp_path):
    from refsr_cli.checkpoint import save_model
    weights = tmp_path / "tiny-x4.safetensors"
    save_model(tiny_model(4), weights)
    folder = tmp_path / "hr"
    folder.mkdir()
    for seed in (1, 2):
        texture(192, 256, seed).save(folder / f"p{seed}.png")
    out = tmp_path / "eval.json"
    for protocol in ("warp", "unrelated"):
        result = run("eval", folder, "--scale", 4, "--weights", weights, "--match-protocol", protocol,
                     "--baseline", "none", "--json", out, "--overwrite")
        assert result.exit_code == 0, result.output
        assert f"--match ({protocol}) against the output without a reference: PSNR-Y" in result.stdout
        means = json.loads(out.read_text())["means"]
        assert set(means) == {"refsr", "match", "protocol reference"} and "confidence" in means["match"]
        assert f"--ref without --match ({protocol}) against the output without a reference" in result.stdout
        gain = means["match"]["psnr"] - means["refsr"]["psnr"]
        if protocol == "warp":
            assert gain > 1 and means["match"]["confidence"] > 0.3
        else:
            assert abs(gain) < 0.1 and means["match"]["confidence"] < 0.1
    # At a --temperature above 0 the refsr row is a prior sample: the line says so.
    result = run("eval", folder, "--scale", 4, "--weights", weights, "--match-protocol", "warp", "--baseline", "none",
                 "--temperature", 1)
    assert result.exit_code == 0, result.output
    assert "--match (warp) against the refsr row (a prior sample at --temperature 1): PSNR-Y" in result.stdout


def test_a_bad_reference_is_reported_and_the_others_used(tmp_path, checkpoint):
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    texture(64, 64, seed=4).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = run("upscale", tmp_path / "lr.png", "--ref", tmp_path / "bad.png", "--ref", tmp_path / "good.png",
                 "--match", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "bad.png" in result.stderr
    info = json.loads(run("info", tmp_path / "out" / "lr_x2_match.png", "--json").stdout)
    assert info["references"] == [str(tmp_path / "good.png")]


def test_references_are_held_in_their_bit_depth_and_give_the_same_output(scene):
    """Every reference's HR pixels are held for the whole batch: as the 8- or 16-bit values they were read as, a
    quarter (a half) of float32, turned back into float32 one reference at a time, bit for bit."""
    hr, view = scene
    lr = downscale(as_tensor(hr), 4)
    eight = np.asarray(view, dtype=np.float32) / 255  # as images.py reads an 8-bit file
    sixteen = (np.asarray(view, dtype=np.uint16) * 257 + 7).astype(np.float32) / 65535  # ... and a 16-bit one
    other = np.random.default_rng(0).random((120, 200, 3), dtype=np.float32)  # no bit depth: kept as float32
    for image, dtype in [(eight, torch.uint8), (sixteen, torch.uint16), (other, torch.float32)]:
        held = match.prepare_reference(image, 4)
        assert held.dtype == dtype
        h, w = held.shape[-2:]
        as_float = torch.from_numpy(np.ascontiguousarray(image[:h, :w])).permute(2, 0, 1)[None]  # what it was
        assert torch.equal(match.reference_pixels(held), as_float)
        assert match.reference_pixels(held).stride() == as_float.stride()
    # The transfer, and its blend into an output, are the same from the held reference as from the float one.
    held = match.prepare_reference(eight, 4)
    h, w = held.shape[-2:]
    as_float = torch.from_numpy(np.ascontiguousarray(eight[:h, :w])).permute(2, 0, 1)[None]
    a, b = match.correspond(lr, [held], 4), match.correspond(lr, [as_float], 4)
    assert torch.equal(a.confidence, b.confidence)
    base = upsample(lr, 4).clamp(0, 1)
    assert torch.equal(a.blend(base[..., 40:120, 16:200], 10, 4), b.blend(base[..., 40:120, 16:200], 10, 4))
