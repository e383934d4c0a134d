"""The output contract for every file a command writes (images, contact sheets, --match-map maps, walk animations)
and the edges found by trying each command as an adversarial user: inputs never written, sidecars under the same
rules as the images, one line and the right exit code for every bad value, provenance that `refsr info` reads."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import one_error_line, write_png
from refsr_cli.cli import main
from refsr_cli.images import is_refsr_output, write_picture


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def photo(tmp_path):
    return write_png(tmp_path / "in.png", 16, 16)


def common(checkpoint, out):
    return ["--scale", 2, "--weights", checkpoint, "-o", out, "-q", "--device", "cpu"]


def test_a_reference_named_like_the_match_map_is_never_overwritten(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    out.mkdir()
    ref = write_png(out / "in_x2_match_map.png", 40, 40, seed=5)  # the name the map would take
    before = ref.read_bytes()
    result = run("upscale", photo, "--ref", ref, "--match", "--match-map", *common(checkpoint, out), "--overwrite")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_match_map.png", "input of this run")
    assert ref.read_bytes() == before


def test_a_reference_named_like_the_walk_animation_is_never_overwritten(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    out.mkdir()
    gif = out / "in_x2_walk.gif"
    Image.open(write_png(tmp_path / "detail.png", 20, 20, seed=4)).save(gif)  # a reference with detail to give
    other = write_png(tmp_path / "other.png", 20, 20, seed=3)
    before = gif.read_bytes()
    result = run("walk", photo, "--ref", gif, "--ref", other, "--steps", 2, "--animate", "gif",
                 *common(checkpoint, out), "--overwrite")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_walk.gif", "input of this run")
    assert gif.read_bytes() == before


def test_a_map_follows_the_output_rules(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    ref = write_png(tmp_path / "ref.png", 40, 40, seed=5)
    args = ["upscale", photo, "--ref", ref, "--match", "--match-map", *common(checkpoint, out)]
    assert run(*args).exit_code == 0
    image, sidecar = out / "in_x2_match.png", out / "in_x2_match_map.png"
    sidecar.write_bytes(b"mine")
    image.unlink()
    result = run(*args)  # the map exists: kept, and the run says so
    assert result.exit_code == 1 and "in_x2_match_map.png exists" in result.stderr
    assert sidecar.read_bytes() == b"mine" and not image.exists()
    sidecar.unlink()
    assert run(*args).exit_code == 0  # nothing exists: both written
    image.unlink()
    before = sidecar.read_bytes()
    result = run(*args, "--skip-existing", "--json")  # the map exists, the image is missing: the image alone
    written = [json.loads(line)["output"] for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and written == [str(image)] and sidecar.read_bytes() == before
    sidecar.unlink()
    result = run(*args, "--skip-existing", "--json")  # the image exists, the map is missing: the map alone
    written = [json.loads(line)["output"] for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and written == [str(sidecar)] and sidecar.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_walk_animation_follows_the_output_rules_and_is_not_read_back_as_an_input(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    args = ["walk", photo, "--seed", 1, "--seed", 2, "--steps", 3, "--animate", "webp", *common(checkpoint, out)]
    assert run(*args).exit_code == 0
    animation = out / "in_x2_walk.webp"
    assert is_refsr_output(animation)
    stamp = animation.read_bytes()
    result = run(*args)
    assert result.exit_code == 1 and "exists" in result.stderr and animation.read_bytes() == stamp
    animation.unlink()
    result = run(*args, "--skip-existing", "--json")  # the frames exist: the animation alone, from them
    written = [json.loads(line)["output"] for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and written == [str(animation)]
    with Image.open(animation) as im:
        assert im.n_frames == 3
    # upscale dir/ -o dir/ takes none of refsr's outputs, the animation included
    result = run("upscale", out, "--scale", 2, "--weights", checkpoint, "-o", out, "-q", "--device", "cpu")
    assert result.exit_code == 1 and "holds only refsr outputs" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["in_x2_walk.webp"] + [f"in_x2_walk00{i}.png" for i in range(3)]
    result = run("upscale", str(out / "*"), "--scale", 2, "--weights", checkpoint, "-o", out, "-q", "--device", "cpu")
    assert result.exit_code == 1 and "matches only refsr outputs" in result.stderr  # a pattern, not a folder


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_a_walk_of_a_16_bit_grey_input_animates_its_frames(tmp_path, checkpoint, fmt):
    values = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    lr = tmp_path / "deep.png"
    write_picture(values[..., None], lr)
    out = tmp_path / "out"
    result = run("walk", lr, "--seed", 1, "--seed", 2, "--steps", 2, "--animate", fmt, *common(checkpoint, out))
    assert result.exit_code == 0, result.output
    frame = np.asarray(Image.open(out / "deep_x2_walk000.png"), dtype=np.float64) / 257
    with Image.open(out / f"deep_x2_walk.{fmt}") as im:
        first = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert first.std() > 20  # not one flat colour
    assert np.abs(first[..., 0] - frame).mean() < 4  # the frame, at 8 bits


def test_info_reads_sheets_and_animations_and_redoes_them(tmp_path, checkpoint, photo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("sample", "in.png", "--n", 3, "--seed", 4, "--sheet", *common(checkpoint, "a")).exit_code == 0
    assert run("walk", "in.png", "--seed", 1, "--seed", 2, "--steps", 2, "--animate", "gif",
               *common(checkpoint, "a")).exit_code == 0
    for name, expected in (("in_x2_sheet.png", "refsr sample in.png --n 3 --seed 4 --temperature 1 --sheet"),
                           ("in_x2_walk.gif", "refsr walk in.png --seed 1 --seed 2 --steps 2 --temperature 1 "
                                              "--animate gif")):
        result = run("info", f"a/{name}", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["redo"].startswith(expected)


def test_a_damaged_record_is_one_line_and_the_next_file_is_still_read(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    assert run("upscale", photo, *common(checkpoint, out)).exit_code == 0
    good = out / "in_x2.png"
    record = json.loads(Image.open(good).info["refsr"])
    for name, damaged in (("lacks.png", {k: v for k, v in record.items() if k != "scale"}),
                          ("wrong.png", record | {"scale": "two"}), ("list.png", record | {"from": 3})):
        write_picture(np.zeros((4, 4, 3), np.uint8), tmp_path / name, provenance=damaged)
    result = run("info", tmp_path / "lacks.png", tmp_path / "wrong.png", tmp_path / "list.png", good)
    assert result.exit_code == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 3 and all(line.startswith("refsr: error: ") for line in errors)
    assert "'scale'" in errors[0] and "'scale'" in errors[1] and "Traceback" not in result.output
    assert f"refsr upscale {photo}" in result.stdout  # the valid file after them is printed


def test_a_walk_between_seeds_at_temperature_zero_is_one_line(tmp_path, checkpoint, photo):
    result = run("walk", photo, "--seed", 1, "--seed", 2, "--temperature", 0, *common(checkpoint, tmp_path / "o"))
    assert result.exit_code == 2
    one_error_line(result, "temperature")


def test_walk_sheet_labels_each_frame_and_refuses_an_animation(tmp_path, checkpoint, photo):
    out = tmp_path / "out"
    result = run("walk", photo, "--seed", 1, "--seed", 2, "--steps", 3, "--sheet", *common(checkpoint, out))
    assert result.exit_code == 0, result.output
    record = json.loads(Image.open(out / "in_x2_sheet.png").info["refsr"])
    assert record["sheet"] == ["frame 1/3", "frame 2/3", "frame 3/3"]
    result = run("walk", photo, "--seed", 1, "--seed", 2, "--sheet", "--animate", "gif", *common(checkpoint, out))
    assert result.exit_code == 2
    one_error_line(result, "--animate", "--sheet")


@pytest.mark.parametrize("env, name", [({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK"),
                                       ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "x"},
                                        "SLURM_STEP_NUM_TASKS"),
                                       ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
                                       ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK"),
                                       ({"RANK": "0", "WORLD_SIZE": "-2"}, "WORLD_SIZE"),
                                       ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK"),
                                       ({"RANK": "1"}, "WORLD_SIZE")])
def test_bad_launcher_environments_stop_the_run_naming_the_variable(tmp_path, checkpoint, photo, env, name):
    clean = {k: None for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")}
    result = run("upscale", photo, *common(checkpoint, tmp_path / "out"), env=clean | env)
    assert result.exit_code == 2
    one_error_line(result, name)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_eval_json_never_writes_over_the_weights(tmp_path, checkpoint):
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", 64, 64)
    before = checkpoint.read_bytes()
    for extra, fragment in (((), "exists"), (("--overwrite",), "weights")):
        result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--json", checkpoint, "--device", "cpu",
                     *extra)
        assert result.exit_code == 2
        one_error_line(result, fragment)
        assert checkpoint.read_bytes() == before


def test_a_sheet_with_a_match_map_is_one_line(tmp_path, checkpoint, photo):
    ref = write_png(tmp_path / "ref.png", 40, 40, seed=5)
    result = run("upscale", photo, "--ref", ref, "--match", "--match-map", "--sheet", *common(checkpoint, tmp_path / "o"))
    assert result.exit_code == 2
    one_error_line(result, "--match-map", "--sheet")


def test_info_reads_the_header_of_an_output_of_any_size(tmp_path):
    """An 8x output of a 2000x1500 photo is 192 Mpx, above Pillow's decompression-bomb warning: info reads only its
    header and text, and must not refuse it."""
    import struct
    import subprocess
    import sys
    import zlib
    write_picture(np.zeros((1, 1, 3), np.uint8), tmp_path / "big.png", provenance={"refsr": "refsr 0", "x": 1})
    data = (tmp_path / "big.png").read_bytes()
    ihdr = struct.pack(">II", 16000, 12000) + data[24:29]  # the same header, another size
    data = data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]
    (tmp_path / "big.png").write_bytes(data)
    # In a fresh process, as `refsr info` runs: nothing else has lifted Pillow's limit there.
    code = f"from refsr_cli.provenance import read_provenance; print(read_provenance({str(tmp_path / 'big.png')!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "'x': 1" in result.stdout, result.stderr


def test_the_record_names_the_tile_an_out_of_memory_retry_used(tmp_path, checkpoint, monkeypatch):
    """A GPU out-of-memory error halves the tiles, for this input and the next; tiles change the last grey level,
    so each record gives the tile its image was made with, and its redo makes the same pixels."""
    import shlex
    import torch
    from refsr_cli.model import RefVAE
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("a.png", "b.png")):
        write_png(tmp_path / name, 40, 40, seed=seed)
    original = RefVAE.encode_lr

    def small_memory(self, x):
        if x.shape[-1] > 24:  # a 16-pixel tile and its 4 pixels of context on each side fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)
    monkeypatch.setattr(RefVAE, "encode_lr", small_memory)
    args = ["--seed", 3, "--temperature", 1, "--tile", 64, "--tile-pad", 4, *common(checkpoint, "first")]
    assert run("upscale", "a.png", "b.png", *args).exit_code == 0
    monkeypatch.setattr(RefVAE, "encode_lr", original)  # the redo runs where memory is plenty
    for name in ("a_x2_s3.png", "b_x2_s3.png"):
        command = json.loads(run("info", f"first/{name}", "--json").stdout)["redo"]
        assert "--tile 16" in command, command
        assert run(*shlex.split(command)[1:], "-o", "again", "-q").exit_code == 0
        assert np.array_equal(np.asarray(Image.open(f"first/{name}")), np.asarray(Image.open(f"again/{name}")))


def test_a_sheet_is_made_with_one_tile_size_when_memory_runs_out_halfway(tmp_path, checkpoint, monkeypatch):
    """Its outputs are decoded a chunk at a time; a retry in the second chunk halves the tiles, and the first
    chunk's crop is made again with them, so that the sheet's redo gives the same pixels."""
    import shlex
    import torch
    from refsr_cli import batch
    from refsr_cli.model import RefVAE
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "a.png", 40, 40)
    original, calls = RefVAE.encode_lr, []

    def memory_runs_out_later(self, x):
        calls.append(x.shape[-1])
        if len(calls) > 1 and x.shape[-1] > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)
    monkeypatch.setattr(RefVAE, "encode_lr", memory_runs_out_later)
    monkeypatch.setattr(batch, "OUTPUTS_BUDGET", 1)  # one output a chunk
    args = ["--n", 3, "--seed", 5, "--sheet", "--tile", 64, "--tile-pad", 4, *common(checkpoint, "first")]
    assert run("sample", "a.png", *args).exit_code == 0
    assert calls[:2] == [40, 40] and calls[-1] <= 24  # the first chunk ran with whole tiles, the last with halved
    monkeypatch.setattr(RefVAE, "encode_lr", original)
    command = json.loads(run("info", "first/a_x2_sheet.png", "--json").stdout)["redo"]
    assert "--tile 16" in command, command
    assert run(*shlex.split(command)[1:], "-o", "again", "-q").exit_code == 0
    assert np.array_equal(np.asarray(Image.open("first/a_x2_sheet.png")), np.asarray(Image.open("again/a_x2_sheet.png")))


def test_an_animation_too_large_to_hold_is_refused_before_its_input_is_worked_on(tmp_path, checkpoint, monkeypatch):
    """Pillow's writers take every frame at once: a walk's animation is bounded like its images and sheets. The
    input that would pass the bound fails on its own, before any frame; the next input is still done."""
    from refsr_cli import images
    monkeypatch.setattr(images, "ANIMATION_BUDGET", 3 * 32 * 32 * 8, raising=False)  # 8 bytes a frame pixel
    small, large = write_png(tmp_path / "small.png", 16, 16), write_png(tmp_path / "large.png", 32, 32)
    out = tmp_path / "out"
    result = run("walk", large, small, "--seed", 1, "--seed", 2, "--steps", 3, "--animate", "gif",
                 *common(checkpoint, out))
    assert result.exit_code == 1
    one_error_line(result, "large_x2_walk.gif", "3 frames of 64x64", "--steps")
    assert sorted(p.name for p in out.iterdir()) == ["small_x2_walk.gif", "small_x2_walk000.png",
                                                     "small_x2_walk001.png", "small_x2_walk002.png"]


def test_the_labels_of_a_sheet_of_a_tiny_image_are_not_cut_to_nothing(tmp_path, checkpoint):
    """8-pixel tiles left no room for "--seed 0": each cell is widened for its label (up to 128 pixels)."""
    from refsr_cli.sheet import GAP, LABEL_HEIGHT
    lr, out = write_png(tmp_path / "tiny.png", 4, 4), tmp_path / "out"
    assert run("sample", lr, "--n", 2, "--seed", 0, "--sheet", *common(checkpoint, out)).exit_code == 0
    sheet = np.asarray(Image.open(out / "tiny_x2_sheet.png").convert("L"))
    label_rows = sheet[GAP + 8:GAP + 8 + LABEL_HEIGHT]
    inked = np.flatnonzero((label_rows < 128).any(axis=0))
    assert len(inked) and inked.max() - inked.min() > 40  # two labels of 8 characters, not two cut to "…"
    first_cell = inked[inked < sheet.shape[1] // 2]
    assert first_cell.max() - first_cell.min() > 30  # "--seed 0" whole, about 45 pixels in the default font
