import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import write_png
from refsr_cli.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_upscale_one_image_per_reference(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    refs = tmp_path / "refs"
    refs.mkdir()
    write_png(refs / "a.png", 40, 40, seed=1)
    write_png(refs / "b.jpg", 40, 40, seed=2)
    out = tmp_path / "out"
    result = run("upscale", lr, "--ref", refs / "a.png", "--ref", refs / "b.jpg", "--scale", 2,
                 "--weights", checkpoint, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert pngs(out) == ["photo_x2_a.png", "photo_x2_b.png"]
    assert Image.open(out / "photo_x2_a.png").size == (32, 24)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "photo_x2_a.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    # A folder of references is the same as naming each.
    result = run("upscale", lr, "--ref", refs, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o2", "-q")
    assert result.exit_code == 0 and pngs(tmp_path / "o2") == pngs(out)


def test_upscale_without_reference_is_the_fidelity_output(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert record == {"input": str(lr), "output": str(tmp_path / "photo_x2.png"), "scale": 2}
    # The same image as a sample at temperature 0, and another than a sample at temperature 1 ...
    assert run("sample", lr, "--n", 1, "--temperature", 0, "--scale", 2, "--weights", checkpoint, "-q",
               "-o", tmp_path / "t0").exit_code == 0
    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731 (the files' provenance differs)
    assert np.array_equal(pixels(tmp_path / "t0" / "photo_x2_s0.png"), pixels(tmp_path / "photo_x2.png"))
    # ... which `upscale --temperature 1 --seed 3` reproduces (named by its seed).
    assert run("sample", lr, "--n", 1, "--seed", 3, "--scale", 2, "--weights", checkpoint, "-q",
               "-o", tmp_path / "t1").exit_code == 0
    assert run("upscale", lr, "--temperature", 1, "--seed", 3, "--scale", 2, "--weights", checkpoint, "-q",
               "-o", tmp_path / "u1").exit_code == 0
    sampled = pixels(tmp_path / "t1" / "photo_x2_s3.png")
    assert np.array_equal(pixels(tmp_path / "u1" / "photo_x2_s3.png"), sampled)
    assert not np.array_equal(sampled, pixels(tmp_path / "photo_x2.png"))


def test_sample_is_reproducible_and_seeds_name_the_files(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    args = ("sample", lr, "--n", 3, "--seed", 4, "--scale", 2, "--weights", checkpoint, "-q")
    assert run(*args, "-o", tmp_path / "a").exit_code == 0
    assert run(*args, "-o", tmp_path / "b").exit_code == 0
    assert pngs(tmp_path / "a") == ["photo_x2_s4.png", "photo_x2_s5.png", "photo_x2_s6.png"]
    for name in pngs(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    s4, s5 = (np.asarray(Image.open(tmp_path / "a" / n), dtype=int) for n in ("photo_x2_s4.png", "photo_x2_s5.png"))
    assert np.abs(s4 - s5).mean() > 0.5
    # --n 1 --seed 5 reproduces the second sample of --n 3 --seed 4.
    assert run("sample", lr, "--n", 1, "--seed", 5, "--scale", 2, "--weights", checkpoint, "-q",
               "-o", tmp_path / "c").exit_code == 0
    assert (tmp_path / "c" / "photo_x2_s5.png").read_bytes() == (tmp_path / "a" / "photo_x2_s5.png").read_bytes()


def test_folders_globs_and_name_collisions(tmp_path, checkpoint):
    for folder in ("day", "night"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "beach.png")
    write_png(tmp_path / "day" / "dune.png")
    (tmp_path / "day" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = run("sample", tmp_path / "day", str(tmp_path / "night" / "*.png"), "--n", 1, "--scale", 2,
                 "--weights", checkpoint, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert pngs(out) == ["day-beach_x2_s0.png", "dune_x2_s0.png", "night-beach_x2_s0.png"]


def test_same_stem_in_one_folder(tmp_path, checkpoint):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "a.jpg", seed=3)
    out = tmp_path / "out"
    result = run("upscale", tmp_path / "a.png", tmp_path / "a.jpg", "--scale", 2, "--weights", checkpoint,
                 "-o", out, "-q")
    assert result.exit_code == 0, result.output
    names = pngs(out)
    assert names == ["a-jpg_x2.png", "a-png_x2.png"]  # the suffix tells them apart, not the folders they share


def test_existing_outputs_are_kept_unless_asked(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    args = ("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert run(*args).exit_code == 0
    target = tmp_path / "out" / "photo_x2.png"
    target.write_bytes(b"precious")
    result = run(*args)
    assert result.exit_code == 1 and "exists" in result.stderr
    assert target.read_bytes() == b"precious"
    assert run(*args, "--skip-existing").exit_code == 0 and target.read_bytes() == b"precious"
    assert run(*args, "--overwrite").exit_code == 0 and Image.open(target).size == (32, 24)


def test_a_bad_file_in_a_batch_is_reported_and_skipped(tmp_path, checkpoint):
    good = write_png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    result = run("upscale", bad, tmp_path / "missing.png", good, "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "out")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("refsr: error:")]
    assert len(errors) == 2
    assert any("bad.png: not an image" in e for e in errors)
    assert any("missing.png: no such file" in e for e in errors)
    assert "Traceback" not in result.output
    assert "1 written, 0 skipped, 2 failed" in result.stderr
    assert pngs(tmp_path / "out") == ["good_x2.png"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args, message", [
    (("--scale", "8"), "x2 checkpoint, but --scale 8"),
    (("--scale", "2", "--half", "--device", "cpu"), "--half needs a GPU"),
])
def test_unusable_settings_stop_before_any_work(tmp_path, checkpoint, args, message):
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--weights", checkpoint, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"refsr: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert message in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_weights_and_bad_flags(tmp_path):
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--weights", tmp_path / "nope.safetensors")
    assert result.exit_code == 2 and "nope.safetensors: no such file" in result.stderr
    result = run("upscale", lr, "--scale", "3")
    assert result.exit_code == 2 and "'3' is not one of" in result.stderr
    result = run("sample", lr, "--n", "-1")
    assert result.exit_code == 2 and "-1 is not in the range" in result.stderr


def test_help_reads_well():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("upscale", "sample", "train"):
        assert command in result.output
        sub = run(command, "--help")
        assert sub.exit_code == 0 and f"Usage: main {command} [OPTIONS]" in sub.output


def test_help_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; from refsr_cli.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_trunk_stage_weights_warn_that_samples_add_nothing(tmp_path, checkpoint):
    from refsr_cli.checkpoint import load_weights, save_model
    trunk_only = tmp_path / "trunk-x2.safetensors"
    save_model(load_weights(checkpoint).model, trunk_only, stage="trunk")
    lr = write_png(tmp_path / "photo.png")
    for weights, texture, warned in ((trunk_only, "learned", True), (checkpoint, "learned", False),
                                     (trunk_only, "analogy", False)):  # the analogy uses no texture branch
        result = run("sample", lr, "--n", 1, "--scale", 2, "--weights", weights, "--texture", texture,
                     "-o", tmp_path / f"{weights.stem}-{texture}")
        assert result.exit_code == 0
        assert ("texture branch is untrained" in result.stderr) == warned
    result = run("upscale", lr, "--scale", 2, "--weights", trunk_only, "-o", tmp_path / "t0")
    assert result.exit_code == 0 and "untrained" not in result.stderr  # the fidelity output was asked for


def test_sheet_writes_one_labelled_grid_of_same_place_crops(tmp_path, checkpoint):
    from refsr_cli.sheet import LABEL_HEIGHT, GAP
    lr = write_png(tmp_path / "photo.png", 40, 36)
    result = run("sample", lr, "--n", 3, "--seed", 2, "--scale", 2, "--weights", checkpoint, "--sheet",
                 "-o", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert record["sheet"] == ["--seed 2", "--seed 3", "--seed 4"]
    assert pngs(tmp_path / "s") == ["photo_x2_sheet.png"]
    sheet = np.asarray(Image.open(tmp_path / "s" / "photo_x2_sheet.png"))
    # The whole 72x80 output is smaller than the 256-pixel window: three whole images in a row.
    assert sheet.shape == (80 + LABEL_HEIGHT + 2 * GAP, 3 * (72 + GAP) + GAP, 3)
    assert run("sample", lr, "--n", 1, "--seed", 3, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "one",
               "-q").exit_code == 0
    second = sheet[GAP:GAP + 80, 2 * GAP + 72:2 * GAP + 144]
    assert np.array_equal(second, np.asarray(Image.open(tmp_path / "one" / "photo_x2_s3.png")))
    refs = [write_png(tmp_path / f"r{i}.png", 20, 20, seed=9 + i) for i in range(2)]
    result = run("upscale", lr, "--ref", refs[0], "--ref", refs[1], "--scale", 2, "--weights", checkpoint, "--sheet",
                 "-o", tmp_path / "u", "--json")
    assert json.loads(result.stdout.strip())["sheet"] == ["--ref r0.png", "--ref r1.png"]


def test_busiest_window_finds_the_detail():
    from refsr_cli.sheet import busiest_window, sheet_window
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    image[60:80, 30:50] = np.random.default_rng(0).integers(0, 255, (20, 20, 3))
    top, left = busiest_window(image, 20)
    assert abs(top - 60) <= 1 and abs(left - 30) <= 1
    rows, cols = sheet_window(image.astype(np.float32) / 255, 4, crop=80)
    assert rows.stop - rows.start == cols.stop - cols.start == 80 and 4 * 58 <= rows.start <= 4 * 62


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_every_output_records_how_it_was_made_and_info_redoes_it(tmp_path, checkpoint, fmt, monkeypatch):
    import hashlib
    import shlex
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "photo.png")
    write_png(tmp_path / "ref.png", 20, 20, seed=3)
    assert run("upscale", "photo.png", "--ref", "ref.png", "--temperature", 0.5, "--seed", 7, "--scale", 2,
               "--weights", checkpoint, "--format", fmt, "-o", "a", "-q").exit_code == 0
    assert run("sample", "photo.png", "--n", 2, "--seed", 4, "--scale", 2, "--weights", checkpoint,
               "--format", fmt, "-o", "a", "-q").exit_code == 0
    # A reference at T = 0 with another seed: another grain, another name, and the redo keeps the seed.
    assert run("upscale", "photo.png", "--ref", "ref.png", "--seed", 3, "--scale", 2,
               "--weights", checkpoint, "--format", fmt, "-o", "a", "-q").exit_code == 0
    for name, expected in ((f"photo_x2_ref_s7.{fmt}", {"reference": "ref.png", "seed": 7, "temperature": 0.5}),
                           (f"photo_x2_ref_s3.{fmt}", {"reference": "ref.png", "seed": 3, "temperature": 0.0}),
                           (f"photo_x2_s5.{fmt}", {"seed": 5, "temperature": 1.0})):
        result = run("info", f"a/{name}", "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert {k: record[k] for k in expected} == expected
        assert record["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert record["input_sha256"] == hashlib.sha256((tmp_path / "photo.png").read_bytes()).hexdigest()
        # The command it prints makes the same file again.
        words = shlex.split(record["redo"])
        assert words[0] == "refsr"
        assert run(*words[1:], "--format", fmt, "-o", "b", "-q").exit_code == 0
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    result = run("info", "photo.png")
    assert result.exit_code == 1 and "no refsr provenance" in result.stderr


def test_shards_split_a_folder_without_writing_a_file_twice(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        write_png(folder / f"{name}.png")
    (tmp_path / "other").mkdir()
    write_png(tmp_path / "other" / "a.png")  # a second a.png: its name depends on the whole list
    everything = run("upscale", folder, tmp_path / "other", "--scale", 2, "--weights", checkpoint, "-o",
                     tmp_path / "all", "-q")
    assert everything.exit_code == 0
    for k in range(3):
        assert run("upscale", folder, tmp_path / "other", "--scale", 2, "--weights", checkpoint, "--shard", f"{k}/3",
                   "-o", tmp_path / "sharded", "-q").exit_code == 0
    assert pngs(tmp_path / "sharded") == pngs(tmp_path / "all")  # the same names: stems from the whole list
    assert len(pngs(tmp_path / "all")) == 6
    assert run("upscale", folder, "--shard", "3/3", "--scale", 2, "--weights", checkpoint).exit_code == 2


@pytest.mark.parametrize("rank, size", [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")])
def test_two_processes_under_a_launcher_share_the_inputs(tmp_path, checkpoint, rank, size):
    import subprocess
    import sys
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_png(folder / f"{name}.png")
    procs = [subprocess.Popen([sys.executable, "-m", "refsr_cli", "upscale", str(folder), "--scale", "2", "--weights",
                               str(checkpoint), "-o", str(tmp_path / "out"), "--json", "--device", "cpu"],
                              env=os.environ | {rank: str(r), size: "2"}, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    written = [[json.loads(line)["output"] for line in p.communicate(timeout=120)[0].splitlines()] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(os.path.basename(o) for o in written[0] + written[1]) == ["a_x2.png", "b_x2.png", "c_x2.png"]
    assert len(written[0]) == 2 and len(written[1]) == 1


def test_a_slurm_jobs_own_shell_is_not_a_launcher(tmp_path, checkpoint):
    """An sbatch script or an salloc shell has SLURM_PROCID=0 and the job's SLURM_NTASKS, with no srun step: it did
    inputs 0, N, 2N... alone, exit 0 and a summary that looked whole."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_png(folder / f"{name}.png")
    job = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": None}
    result = CliRunner().invoke(main, ["upscale", str(folder), "--scale", "2", "--weights", str(checkpoint), "-o",
                                       str(tmp_path / "out"), "-q"], env=job)
    assert result.exit_code == 0, result.output
    assert pngs(tmp_path / "out") == ["a_x2.png", "b_x2.png", "c_x2.png"]


def test_walk_between_two_seeds_and_two_references(tmp_path, checkpoint):
    lr = write_png(tmp_path / "photo.png")
    result = run("walk", lr, "--seed", 3, "--seed", 7, "--steps", 4, "--animate", "gif", "--scale", 2,
                 "--weights", checkpoint, "-o", tmp_path / "w", "-q")
    assert result.exit_code == 0, result.output
    frames = [f"photo_x2_walk{i:03d}.png" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["photo_x2_walk.gif"] + frames
    # The ends are the samples of those seeds.
    assert run("sample", lr, "--n", 1, "--seed", 7, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "s",
               "-q").exit_code == 0
    last, sample = (np.asarray(Image.open(p)) for p in (tmp_path / "w" / frames[-1], tmp_path / "s" / "photo_x2_s7.png"))
    assert np.abs(last.astype(int) - sample).max() <= 1  # within a grey level: the frames are decoded as a batch
    first, second = (np.asarray(Image.open(tmp_path / "w" / f), dtype=int) for f in frames[:2])
    assert np.abs(first - second).mean() > 0
    with Image.open(tmp_path / "w" / "photo_x2_walk.gif") as gif:
        assert gif.n_frames == 4
    info = json.loads(run("info", tmp_path / "w" / frames[1], "--json").stdout)
    assert info["frame"] == 1 and info["frames"] == 4 and "refsr walk" in info["redo"] and "--seed 3 --seed 7" in info["redo"]
    refs = [write_png(tmp_path / f"r{i}.png", 20, 20, seed=9 + i) for i in range(2)]
    result = run("walk", lr, "--ref", refs[0], "--ref", refs[1], "--steps", 3, "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "r", "-q")
    assert result.exit_code == 0 and len(list((tmp_path / "r").iterdir())) == 3
    assert run("walk", lr, "--seed", 1, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "x").exit_code == 2
