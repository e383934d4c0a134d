import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from conftest import smooth_image, write_png
from refsr_cli.checkpoint import load_backbone, weights_dir
from refsr_cli.cli import against_fidelity, main
from refsr_cli.evaluate import diversity_score, feature_stats, reference_influence
from refsr_cli.metrics import LPIPSAlex
from refsr_cli.model import VGG16Features


def plain_y(rgb_uint8):
    rgb = rgb_uint8.astype(np.float64) / 255
    return 16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def plain_ssim(a, b):
    """Wang et al. 2004 written out: Gaussian 11x11 (sigma 1.5) weighted statistics of each valid window."""
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for y in range(a.shape[0] - 10):
        for x in range(a.shape[1] - 10):
            pa, pb = a[y:y + 11, x:x + 11], b[y:y + 11, x:x + 11]
            ma, mb = (window * pa).sum(), (window * pb).sum()
            va, vb = (window * (pa - ma) ** 2).sum(), (window * (pb - mb) ** 2).sum()
            cov = (window * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def plain_lpips(a, b):
    """LPIPS v0.1 (alex) from the official recipe, reading the shipped weights directly."""
    w = load_file(str(weights_dir() / "lpips_alex.safetensors"))
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    specs = [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]  # stride, padding of conv1..conv5

    def features(x):
        x = ((torch.tensor(x).permute(2, 0, 1)[None].float() / 255 * 2 - 1) - shift) / scale
        out = []
        for i, (stride, pad) in enumerate(specs):
            x = torch.relu(torch.nn.functional.conv2d(x, w[f"convs.{i}.weight"], w[f"convs.{i}.bias"], stride, pad))
            out.append(x)
            if i < 2:
                x = torch.nn.functional.max_pool2d(x, 3, 2)
        return out

    total = 0.0
    for i, (fa, fb) in enumerate(zip(features(a), features(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += (w[f"lins.{i}.weight"].view(1, -1, 1, 1) * (na - nb) ** 2).sum(1).mean().item()
    return total


def test_bicubic_baseline_matches_a_plain_computation(tmp_path, checkpoint):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    # 67x45 is not a multiple of 2: the evaluation must crop it to 66x44 first.
    Image.fromarray(smooth_image(45, 67, seed=3)).save(hr_dir / "a.png")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(hr_dir), "--scale", "2", "--weights", str(checkpoint), "--json",
                                       str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    bicubic = next(r for r in json.loads(out.read_text())["rows"] if r["method"] == "bicubic")

    hr = smooth_image(45, 67, seed=3)[:44, :66]
    lr = Image.fromarray(hr).resize((33, 22), Image.BICUBIC)
    sr = np.asarray(lr.resize((66, 44), Image.BICUBIC))
    y_sr, y_hr = plain_y(sr)[2:-2, 2:-2], plain_y(hr)[2:-2, 2:-2]
    assert bicubic["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / np.mean((y_sr - y_hr) ** 2)), abs=1e-6)
    assert bicubic["ssim"] == pytest.approx(plain_ssim(y_sr, y_hr), abs=1e-6)
    assert bicubic["lpips"] == pytest.approx(plain_lpips(sr, hr), abs=1e-5)
    relr = np.asarray(Image.fromarray(sr).resize((33, 22), Image.BICUBIC), dtype=np.float64)
    assert bicubic["lr_psnr"] == pytest.approx(
        10 * math.log10(255 ** 2 / np.mean((relr - np.asarray(lr, dtype=np.float64)) ** 2)), abs=1e-6)


def test_diversity_score():
    lpips = LPIPSAlex()
    load_backbone(lpips, "lpips_alex")
    hr = Image.fromarray(smooth_image(64, 64, seed=0))
    a, b = (Image.fromarray(smooth_image(64, 64, seed=s)) for s in (1, 2))
    assert diversity_score([a, a], hr, lpips) == pytest.approx(0, abs=1e-4)  # identical samples: no diversity
    # Two samples, each right on a different half: the per-pixel minimum is far below either sample's mean.
    left = np.asarray(hr).copy()
    left[:, 32:] = np.asarray(a)[:, 32:]
    right = np.asarray(hr).copy()
    right[:, :32] = np.asarray(a)[:, :32]
    score = diversity_score([Image.fromarray(left), Image.fromarray(right)], hr, lpips)
    assert 20 < score <= 100
    assert 0 <= diversity_score([a, b], hr, lpips) < score


def test_reference_influence():
    refs = [torch.tensor([0.0, 0.0]), torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])]
    assert reference_influence([r + 0.1 for r in refs], refs) == 1.0  # each output next to its reference
    same = [torch.tensor([1.0, 1.0])] * 3
    assert reference_influence(same, refs) == pytest.approx(1 / 3)  # outputs ignore the reference: ties -> row 0
    # Outputs that all lean towards reference 1 still count when each leans most towards its own (column centring).
    leaning = [torch.tensor([4.0, 0.0]) + 0.5 * r / 5 for r in refs]
    assert reference_influence(leaning, refs) == 1.0


def test_feature_stats_of_small_and_thin_images_are_finite():
    """AlexNet's conv5 is 1x1 under 47 pixels (a standard deviation of one value is NaN): such images are enlarged,
    a long thin one too."""
    lpips, vgg = LPIPSAlex(), VGG16Features()
    for h, w in ((16, 20), (40, 40), (20, 700)):
        image = np.random.default_rng(h).random((h, w, 3), dtype=np.float32)
        for features in (lpips.features, lambda x: vgg(x, all_layers=True)):
            assert torch.isfinite(feature_stats(features, image)).all()


def test_eval_cli_with_samples_and_references(tmp_path, checkpoint):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(48, 40, seed=i)).save(hr_dir / f"{i}.png")
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        write_png(refs / f"r{i}.png", 40, 40, seed=20 + i)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(hr_dir), "--scale", "2", "--weights", str(checkpoint),
                                       "--samples", "3", "--ref", str(refs), "--num-refs", "3", "--json", str(out),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["means"]) == {"bicubic", "refsr", "samples", "references"}
    assert len(data["references"]) == 3 and len(data["rows"]) == 2 * 4
    assert 0 <= data["means"]["samples"]["diversity"] <= 100
    assert 0 <= data["means"]["references"]["influence"] <= 1
    assert 0 <= data["means"]["references"]["influence_alex"] <= 1
    assert "diversity" in result.output and "influence" in result.output
    samples = [r for r in data["rows"] if r["method"] == "samples"]
    assert data["means"]["samples"]["lr_psnr"] == min(r["lr_psnr"] for r in samples)


def test_eval_on_a_standard_benchmark_shows_the_published_rows(tmp_path, checkpoint):
    hr_dir = tmp_path / "Set14"
    hr_dir.mkdir()
    Image.fromarray(smooth_image(48, 40, seed=0)).save(hr_dir / "0.png")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(hr_dir), "--scale", "2", "--weights", str(checkpoint),
                                       "--json", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    published = json.loads(out.read_text())["published"]
    assert {"image": "published", "method": "SRCNN", "psnr": 32.45} in published
    assert "SRCNN" in result.output and "32.45" in result.output
    other = tmp_path / "photos"
    hr_dir.rename(other)
    result = CliRunner().invoke(main, ["eval", str(other), "--scale", "2", "--weights", str(checkpoint),
                                       "--json", str(out), "--overwrite", "--device", "cpu"])
    assert json.loads(out.read_text())["published"] == [] and "SRCNN" not in result.output


# --- bad inputs: one line on stderr each, exit 2 when nothing could start, 1 when some images failed ----------------

def eval_run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args), "--device", "cpu"])


def error_lines(result):
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.startswith("refsr: error: ") for line in lines), result.stderr
    return lines


def hr_folder(tmp_path, name="hr", sizes=((48, 40), (40, 56))):
    folder = tmp_path / name
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(smooth_image(h, w, seed=i)).save(folder / f"{i}.png")
    return folder


def test_a_folder_without_images_is_refused(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = eval_run(tmp_path / "empty", "--scale", 2, "--weights", checkpoint)
    assert result.exit_code == 2 and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 1 and "empty: no images to evaluate" in lines[0]


def test_the_unrelated_protocol_refuses_a_single_image(tmp_path, checkpoint):
    # The next image of a one-image folder is the image itself: it matched itself (+20.9 dB) before.
    folder = hr_folder(tmp_path, sizes=((48, 40),))
    result = eval_run(folder, "--scale", 2, "--weights", checkpoint, "--match-protocol", "unrelated")
    assert result.exit_code == 2 and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 1 and "--match-protocol unrelated" in lines[0] and "at least two images" in lines[0]


def test_a_bad_image_is_reported_and_the_others_measured(tmp_path, checkpoint):
    folder = hr_folder(tmp_path)
    (folder / "1b-corrupt.png").write_bytes(b"not an image at all")
    Image.fromarray(smooth_image(16, 16, seed=5)).save(folder / "2-tiny.png")  # too small for x2 (LPIPS needs 31)
    out = tmp_path / "eval.json"
    result = eval_run(folder, "--scale", 2, "--weights", checkpoint, "--json", out)
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert len(lines) == 2
    assert "1b-corrupt.png: not an image" in lines[0] and str(folder) in lines[0]
    assert "2-tiny.png: 16x16 is too small to evaluate at x2" in lines[1]
    data = json.loads(out.read_text())
    assert {r["image"] for r in data["rows"]} == {"0.png", "1.png"} and len(data["rows"]) == 4
    assert [f["image"] for f in data["failed"]] == ["1b-corrupt.png", "2-tiny.png"]
    assert "0.png" in result.stdout and "mean" in result.stdout and "corrupt" not in result.stdout


def test_no_image_that_can_be_measured_exits_2(tmp_path, checkpoint):
    folder = tmp_path / "hr"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(smooth_image(8, 8)).save(folder / "b.png")
    out = tmp_path / "eval.json"
    result = eval_run(folder, "--scale", 2, "--weights", checkpoint, "--json", out)
    assert result.exit_code == 2 and not out.exists() and result.stdout == ""
    lines = error_lines(result)
    assert len(lines) == 3 and "a.png" in lines[0] and "b.png" in lines[1]
    assert "no image of" in lines[2] and "could be measured" in lines[2]


def test_too_small_to_match_names_the_file(tmp_path):
    from refsr_cli.checkpoint import save_model
    from conftest import tiny_model
    weights = tmp_path / "tiny-x8.safetensors"
    save_model(tiny_model(8), weights)
    # 36 pixels: enough to measure at x8 (32), not to match (40), whether as the warped copy or as the next image.
    folder = hr_folder(tmp_path, sizes=((36, 36), (64, 64)))
    for protocol, fragment in [("warp", "0.png: its warp reference: too small to match at x8"),
                               ("unrelated", "1.png: its reference " + str(folder / "0.png") + ": too small to match")]:
        result = eval_run(folder, "--scale", 8, "--weights", weights, "--match-protocol", protocol,
                          "--baseline", "none")
        assert result.exit_code == 1, result.output
        lines = error_lines(result)
        assert len(lines) == 1 and fragment in lines[0], (protocol, lines)


@pytest.mark.parametrize("case", ["num-refs over refs", "num-refs without ref", "unreadable ref", "tiny refs",
                                  "json in a missing folder", "json onto a folder", "json onto an input"])
def test_bad_flags_are_refused_before_measuring(tmp_path, checkpoint, case):
    folder = hr_folder(tmp_path)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        write_png(refs / f"r{i}.png", 40, 40, seed=20 + i)
    write_png(tmp_path / "tiny.png", 8, 8)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    broken, tiny = tmp_path / "broken.jpg", tmp_path / "tiny.png"
    args, fragment = {
        "num-refs over refs": (("--ref", refs, "--num-refs", 3), "--num-refs 3: --ref gives 2 image(s)"),
        "num-refs without ref": (("--num-refs", 2), "--num-refs needs --ref"),
        "unreadable ref": (("--ref", refs, "--ref", broken), f"reference {broken}"),
        "tiny refs": (("--ref", refs, "--ref", tiny), "tiny.png: too small for the reference influence"),
        "json in a missing folder": (("--json", tmp_path / "no" / "e.json"), "is not a folder that can be written"),
        "json onto a folder": (("--json", refs), "is a folder"),
        "json onto an input": (("--json", folder / "0.png"), "is an input of this run"),
    }[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = eval_run(folder, "--scale", 2, "--weights", checkpoint, *args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = error_lines(result)
    assert len(lines) == 1 and fragment in lines[0], lines
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing overwritten


def test_a_difference_that_rounds_to_nothing_reads_plus_zero():
    fidelity = {"psnr": 30.0, "lpips": 0.25}
    assert against_fidelity({"psnr": 29.999, "lpips": 0.24999}, fidelity) == "PSNR-Y +0.00 dB, LPIPS +0.0000 (+0.0 %)"
    assert against_fidelity({"psnr": 31.0, "lpips": 0.2}, fidelity) == "PSNR-Y +1.00 dB, LPIPS -0.0500 (-20.0 %)"
    assert against_fidelity({"psnr": 31.0, "lpips": 0.2}, {"psnr": 30.0, "lpips": 0.0}).endswith("LPIPS +0.2000")
