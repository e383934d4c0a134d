"""Issue 29's classes beyond data loss: numbers that are not numbers (in options, losses and weight files), sidecars
and redo commands that must tell the truth, and inputs that used to give a traceback or unbounded work."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import one_error_line, tiny_model, write_png
from refsr_cli.checkpoint import load_weights, read_metadata, save_model
from refsr_cli.analogy import Texture
from refsr_cli.cli import main
from refsr_cli.engine import Upscaler
from refsr_cli.options import EngineOptions
from test_cli import run
from test_data_loss import photos


def poisoned(checkpoint, path):
    """`checkpoint` with one weight made nan, written as any safetensors writer would (no refsr check on the way)."""
    tensors = load_file(str(checkpoint))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=read_metadata(checkpoint))
    return path


def test_a_step_that_diverges_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from refsr_cli import train
    from refsr_cli.errors import RefsrError
    from test_train import trunk_options
    real = train.set_learning_rate

    def diverging(optimizers, opt, step):  # as --learning-rate far too high would, after a first good step
        optimizers = list(optimizers)
        real(optimizers, opt, step)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = float("inf") if step >= 1 else group["lr"]

    monkeypatch.setattr(train, "set_learning_rate", diverging)
    out = tmp_path / "run"
    with pytest.raises(RefsrError, match=r"^step 2: .*last checkpoint \(step 1\) is kept: to go on at a lower "
                                         "--learning-rate, give it to --init"):
        train.fit(trunk_options((photos(tmp_path / "photos"), None), out, scales=(2,), steps=4, save_every=1))
    assert read_metadata(out / "x2.safetensors")["step"] == "1"
    load_weights(out / "x2.safetensors").model  # finite, and loads
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_non_finite_weights_are_never_written(tmp_path):
    model = tiny_model(2)
    with torch.no_grad():
        model.to_rgb.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(Exception, match="not all finite"):
        save_model(model, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_refused_on_load_naming_the_file(tmp_path, checkpoint):
    bad = poisoned(checkpoint, tmp_path / "nan.safetensors")
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", bad, "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "nan.safetensors", "not all finite")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_non_finite_training_state_is_refused_on_resume(tmp_path, checkpoint):
    from test_train import trunk_options
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    state = out / "last.state.safetensors"
    poisoned(state, state)
    with pytest.raises(RefsrError, match="last.state.safetensors: .*not all finite"):
        fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1, resume=True))


def walk(lr, checkpoint, out, *args):
    return run("walk", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "--steps", 3, "-q", *args)


def test_an_animation_is_made_only_of_this_walks_frames(tmp_path, checkpoint):
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert walk(lr, checkpoint, out, "--seed", 1, "--seed", 2).exit_code == 0
    frames = {p.name: p.read_bytes() for p in out.iterdir()}
    # Other seeds: the frames kept would be another walk's; nothing is written over them, and no animation lies.
    result = walk(lr, checkpoint, out, "--seed", 3, "--seed", 4, "--animate", "gif", "--skip-existing")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_walk000.png", "not frame 0 of this walk")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == frames
    # A user's file at a frame's name is not a frame either.
    (out / "in_x2_walk001.png").write_bytes(write_png(tmp_path / "mine.png", 32, 32, seed=7).read_bytes())
    result = walk(lr, checkpoint, out, "--seed", 1, "--seed", 2, "--animate", "gif", "--skip-existing")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_walk001.png", "not frame 1 of this walk")
    assert not (out / "in_x2_walk.gif").exists()


def test_an_animation_of_verified_frames_kept_by_skip_existing(tmp_path, checkpoint):
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert walk(lr, checkpoint, out, "--seed", 1, "--seed", 2).exit_code == 0
    frames = {p.name: p.read_bytes() for p in out.iterdir()}
    result = walk(lr, checkpoint, out, "--seed", 1, "--seed", 2, "--animate", "gif", "--skip-existing")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in frames} == frames
    assert (out / "in_x2_walk.gif").exists()


def test_redo_commands_run_where_they_say_for_folder_inputs_and_dashed_names(tmp_path, checkpoint, monkeypatch):
    import shlex
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "refs").mkdir()
    write_png(tmp_path / "in" / "-weird.png", 16, 16, seed=1)
    write_png(tmp_path / "-dashed.png", 16, 16, seed=2)
    write_png(tmp_path / "refs" / "-paint.png", 40, 40, seed=3)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "-tiny.safetensors").write_bytes(checkpoint.read_bytes())
    for inputs, name in ((["in"], "-weird_x2_-paint.png"), (["./-dashed.png"], "-dashed_x2_-paint.png")):
        result = run("upscale", *inputs, "--ref", "refs/-paint.png", "--scale", 2, "--weights",
                     "w/-tiny.safetensors", "-o", "a", "-q")
        assert result.exit_code == 0, result.output
        command = json.loads(run("info", f"a/{name}", "--json").stdout)["redo"]
        words = shlex.split(command)
        assert run(*words[1:], "-o", "b", "-q").exit_code == 0, command
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_info_on_records_that_hold_the_wrong_things_is_one_line_each(tmp_path, checkpoint):
    from PIL import Image, PngImagePlugin
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
    good = out / "in_x2.png"
    record = json.loads(Image.open(good).info["refsr"])
    walk = record | {"command": "walk", "frames": 2, "from": {"seed": 1}, "to": {"seed": 2}}
    damaged = {"null-input": record | {"input": None}, "list-weights": record | {"weights": ["a", "b"]},
               "null-reference": record | {"reference": None}, "list-reference": record | {"reference": ["a"]},
               "null-in-references": record | {"references": [None], "references_sha256": ["0"]},
               "dict-in-reference-list": record | {"command": "sample", "reference_list": [{"a": 1}]},
               "null-seeds": record | {"command": "sample", "seeds": [None]},
               "bool-seeds": record | {"command": "sample", "seeds": [True]},
               "list-end": walk | {"from": {"reference": ["a"], "seed": 1}},
               "null-end": walk | {"to": {"seed": None}}, "empty-end": walk | {"to": {}}}
    paths = []
    for name, bad in damaged.items():
        info = PngImagePlugin.PngInfo()
        info.add_text("refsr", json.dumps(bad))
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png", pnginfo=info)
        paths.append(tmp_path / f"{name}.png")
    deep = PngImagePlugin.PngInfo()
    deep.add_text("refsr", "[" * 100_000 + "]" * 100_000)
    Image.new("RGB", (4, 4)).save(tmp_path / "deep.png", pnginfo=deep)
    paths.append(tmp_path / "deep.png")
    for path in paths:
        result = run("info", path)
        assert result.exit_code == 1, (path.name, result.output)
        one_error_line(result, path.name)
        result = run("info", path, "--json")
        assert result.exit_code == 1 and "Traceback" not in result.output, path.name
    result = run("info", *paths, good)  # and the good file after them is still read
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == len(paths)
    assert f"refsr upscale {lr}" in result.stdout


@pytest.mark.parametrize("env, name", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
                                       ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
                                       ({"RANK": "1"}, "WORLD_SIZE"),
                                       ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
                                       ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "0"},
                                        "SLURM_STEP_NUM_TASKS"),
                                       ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID"),
                                       ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, "torchrun")])
def test_bad_launcher_environments_stop_train_naming_the_variable(tmp_path, env, name):
    clean = {k: None for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")}
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(photos(tmp_path / "photos")), "--out", str(out),
                                       "--steps", "1", "--device", "cpu", "-q"], env=clean | env)
    assert result.exit_code == 2, result.output
    one_error_line(result, name)
    assert not out.exists()


def train_args(tmp_path, *extra):
    return ["train", "--data", photos(tmp_path / "photos"), "--out", tmp_path / "run", "--scale", 2, "--steps", 1,
            "--batch", 2, "--lr-patch", 8, "--perceptual-crop", 32, "--device", "cpu", "-q", *extra]


@pytest.mark.parametrize("flags, fragment", [(("--imle-samples", 100000), "--imle-samples"),
                                             (("--imle-samples", 0), "--imle-samples"),
                                             (("--pool-size", 100000, "--lr-patch", 256), "--pool-size 100000"),
                                             (("--pool-size", 10 ** 12), "--pool-size")])
def test_train_sizes_that_cannot_fit_are_refused_up_front(tmp_path, checkpoint, flags, fragment):
    import time
    started = time.time()
    result = run(*train_args(tmp_path, "--init", checkpoint, *flags))
    assert result.exit_code == 2, result.output
    one_error_line(result, fragment)
    assert time.time() - started < 30  # before anything was allocated
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_a_train_size_past_all_memory_is_said_in_a_short_number(tmp_path, checkpoint):
    import re
    result = run(*train_args(tmp_path, "--init", checkpoint, "--lr-patch", 10 ** 19))
    assert result.exit_code == 2, result.output
    one_error_line(result, "--lr-patch 10000000000000000000", "e+")
    assert not re.search(r"\d{12}\.", result.stderr)  # not the GiB in 35 digits


def test_running_out_of_memory_in_train_is_one_line(tmp_path, checkpoint, monkeypatch):
    from refsr_cli.stages import TextureStage

    def exhausted(self, step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 47244640256 bytes")

    monkeypatch.setattr(TextureStage, "losses", exhausted)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2))
    assert result.exit_code == 2
    one_error_line(result, "out of memory", "--batch")


def test_a_full_disk_during_train_is_one_line_and_keeps_the_last_checkpoint(tmp_path, checkpoint, monkeypatch):
    from safetensors import SafetensorError
    from refsr_cli import checkpoint as checkpoints
    real, saves = checkpoints.save_file, []

    def filling(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) <= 2:  # step 1's state and checkpoint fit; the disk is full at step 2's
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"half a checkpoint")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", filling)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--steps", 3,
                             "--save-every", 1))
    assert result.exit_code == 2
    one_error_line(result, "No space left on device", "last.state.safetensors")
    run_folder = tmp_path / "run"
    assert sorted(p.name for p in run_folder.iterdir()) == ["last.safetensors", "last.state.safetensors",
                                                            "log.jsonl"]
    assert read_metadata(run_folder / "last.state.safetensors")["step"] == "1"
    load_weights(run_folder / "last.safetensors").model


def test_a_full_disk_while_logging_is_one_line(tmp_path, checkpoint, monkeypatch):
    import errno
    from refsr_cli import train

    class FullLog:
        """log.jsonl on a disk that is full: opened, but no row can be written."""
        name = str(tmp_path / "run" / "log.jsonl")

        def __init__(self):
            self.file = open(self.name, "a")

        def fileno(self):
            return self.file.fileno()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            self.file.close()

    monkeypatch.setattr(train, "open_log", lambda *a: FullLog())
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2,
                             "--log-every", 1))
    assert result.exit_code == 2
    one_error_line(result, "log.jsonl", "No space left on device")


def with_config(checkpoint, path, **changes):
    """`checkpoint`'s weights under a config with `changes` (written as any safetensors writer would)."""
    meta = read_metadata(checkpoint)
    meta["config"] = json.dumps(json.loads(meta["config"]) | changes)
    save_file(load_file(str(checkpoint)), str(path), metadata=meta)
    return path


@pytest.mark.parametrize("changes, fragment", [({"channels": 1_000_000}, "channels=1000000 is past"),
                                               ({"lr_blocks": 10 ** 9}, "lr_blocks"),
                                               ({"up_channels": [8] * 10 ** 6}, "up_channels"),
                                               ({"ref_size": 10 ** 6}, "ref_size"),
                                               ({"channels": 1024, "lr_blocks": 256}, "weights, past the")])
def test_a_checkpoint_asking_for_absurd_sizes_is_refused_before_anything_is_allocated(tmp_path, checkpoint, changes,
                                                                                      fragment):
    import time
    bad = with_config(checkpoint, tmp_path / "huge.safetensors", **changes)
    started = time.time()
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", bad, "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "huge.safetensors", fragment)
    assert time.time() - started < 20


def test_a_damaged_training_state_is_one_line_on_resume(tmp_path):
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    state = out / "last.state.safetensors"
    tensors, meta = load_file(str(state)), read_metadata(state)
    for damaged in ({k: v for k, v in meta.items() if k != "param_groups"}, meta | {"step": "one"},
                    meta | {"scaler": "{"}, meta | {"config": json.dumps(json.loads(meta["config"]) | {"z_dim": 10 ** 7})}):
        save_file(tensors, str(state), metadata=damaged)
        with pytest.raises(RefsrError, match="last.state.safetensors"):
            fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1, resume=True))


def test_bench_match_finds_its_default_photo_from_any_folder_and_refuses_an_unreadable_one(tmp_path):
    import subprocess
    import sys
    script = Path(__file__).resolve().parent.parent / "bench" / "match.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    import re
    default = Path(re.findall(r"\(default:([^()]*)\)", "".join(shown.stdout.split()))[-1])  # a path wraps lines
    assert default.is_absolute() and default.is_file()
    (tmp_path / "not-a-photo.png").write_text("text")
    for photo in ("missing.png", "not-a-photo.png"):
        done = subprocess.run([sys.executable, str(script), "--photo", photo], cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 1 and photo in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_fifo_named_as_input_reference_or_record_is_refused_not_waited_on(tmp_path, checkpoint):
    import os
    import subprocess
    import sys
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    photo = write_png(tmp_path / "in.png")
    refsr = [sys.executable, "-m", "refsr_cli"]
    for args, code in ((["upscale", fifo, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o"], 1),
                       (["upscale", photo, "--ref", fifo, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o"], 2),
                       (["info", fifo], 1)):
        done = subprocess.run(refsr + [str(a) for a in args], capture_output=True, text=True, timeout=60)
        assert done.returncode == code, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("refsr: error: ")]
        assert len(lines) == 1 and "fifo.png" in lines[0] and "not a regular file" in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_eval_measures_the_photos_of_a_folder_not_refsrs_outputs_in_it(tmp_path, checkpoint):
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", 64, 64)
    assert run("upscale", hr / "a.png", "--scale", 2, "--weights", checkpoint, "-o", hr, "-q").exit_code == 0
    assert (hr / "a_x2.png").exists()
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert {r["image"] for r in json.loads((tmp_path / "m.json").read_text())["rows"]} == {"a.png"}


@pytest.mark.parametrize("args, fragment", [
    (("walk", "in.png", "--scale", 2), "give the two ends of the walk"),
    (("upscale", "in.png", "--consistency-steps", 1_000_000), "--consistency-steps"),
    (("eval", ".", "--consistency-steps", 1_000_000), "--consistency-steps"),
    (("train", "--data", ".", "--flat-weight", "nan"), "--flat-weight"),
])
def test_the_also_list_of_issue_29_is_one_line_each(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "in.png")
    result = run(*args)
    assert result.exit_code == 2
    one_error_line(result, fragment)


def test_the_pixel_limit_hint_names_the_commands_that_raise_it(tmp_path, checkpoint):
    from PIL import Image
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.new("RGB", (9000, 8000)).save(hr / "big.png")  # 72 Mpx, over the 64 Mpx limit
    write_png(hr / "a.png", 64, 64)
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint)
    assert result.exit_code == 1
    one_error_line(result, "big.png", "upscale, sample and walk raise it with --max-pixels")


# --- the fresh sweep of these classes' neighbours (helper sweep of 2026-12-06) -------------------------------------

def test_a_critic_too_big_for_the_crop_is_refused_in_one_line(tmp_path, checkpoint):
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2,
                             "--adv-weight", 1))  # --lr-patch 8 at x2: 16-pixel windows
    assert result.exit_code == 2
    one_error_line(result, "--adv-weight", "24")


def test_a_gif_comment_nested_deep_is_one_line_and_the_next_file_is_read(tmp_path, checkpoint):
    from PIL import Image
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "deep.gif", comment=("[" * 50_000 + "]" * 50_000).encode())
    result = run("info", tmp_path / "deep.gif", out / "in_x2.png")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1 and "deep.gif" in result.stderr
    assert f"refsr upscale {lr}" in result.stdout


def test_weights_finite_in_float64_but_not_in_float32_are_refused(tmp_path, checkpoint):
    tensors = {k: v.double() for k, v in load_file(str(checkpoint)).items()}
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = 1e300
    big = tmp_path / "big.safetensors"
    save_file(tensors, str(big), metadata=read_metadata(checkpoint))
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", big, "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "big.safetensors", "not all finite")


def image_with_record(tmp_path, checkpoint, changes: dict) -> Path:
    """tmp_path/bad.png, holding the record of a real upscale output with `changes` made to it."""
    from PIL import Image, PngImagePlugin
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
    info = PngImagePlugin.PngInfo()
    info.add_text("refsr", json.dumps(json.loads(Image.open(out / "in_x2.png").info["refsr"]) | changes))
    Image.new("RGB", (4, 4)).save(tmp_path / "bad.png", pnginfo=info)
    return tmp_path / "bad.png"


@pytest.mark.parametrize("changes, key", [({"temperature": float("nan")}, "temperature"),
                                          ({"temperature": float("inf")}, "temperature"),
                                          ({"temperature": 1e308}, "temperature"),
                                          ({"temperature": True}, "temperature"),
                                          ({"strength": float("nan")}, "strength"),
                                          ({"seed": -3}, "seed"), ({"seed": 2 ** 70}, "seed"),
                                          ({"tile": -5}, "tile"), ({"consistency_steps": 10 ** 6}, "consistency_steps"),
                                          ({"scale": 3}, "scale"), ({"texture": "zzz"}, "texture"),
                                          ({"command": "walk", "frames": -1, "from": {"seed": 1}, "to": {"seed": 2}},
                                           "frames"),
                                          ({"command": "walk", "frames": 3, "from": {"seed": -1}, "to": {"seed": 2}},
                                           "walk end"),
                                          ({"command": "sample", "seeds": [1, -2]}, "seeds")])
def test_info_refuses_records_whose_numbers_no_flag_takes(tmp_path, checkpoint, changes, key):
    bad = image_with_record(tmp_path, checkpoint, changes)
    for extra in ((), ("--json",)):
        result = run("info", bad, *extra)
        assert result.exit_code == 1 and result.stdout == ""
        one_error_line(result, "bad.png", key)


def test_redo_commands_keep_the_format_and_every_digit(tmp_path, checkpoint, monkeypatch):
    import shlex
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "in.png", 16, 16)
    write_png(tmp_path / "ref.png", 40, 40, seed=3)
    assert run("upscale", "in.png", "--ref", "ref.png", "--strength", 0.33333333, "--temperature", 0.1234567,
               "--scale", 2, "--weights", checkpoint, "--format", "jpg", "-o", "a", "-q").exit_code == 0
    command = json.loads(run("info", "a/in_x2_ref.jpg", "--json").stdout)["redo"]
    assert "--format jpg" in command and "--strength 0.33333333" in command and "--temperature 0.1234567" in command
    assert run(*shlex.split(command)[1:], "-o", "b", "-q").exit_code == 0
    assert (tmp_path / "b" / "in_x2_ref.jpg").read_bytes() == (tmp_path / "a" / "in_x2_ref.jpg").read_bytes()


@pytest.mark.parametrize("args, fragment", [
    (("eval", "hr", "--seed", 2 ** 63 - 1, "--samples", 2), "seeds go up to"),
    (("sample", "in.png", "--n", 101, "--sheet"), "at most 100 tiles"),
    (("upscale", "in.png", "--shard", "0/99999999999999999999999"), "--shard"),
    (("upscale", "in.png", "--shard", "\u0663/\u0664"), "--shard"),
    (("train", "--data", "hr", "--val-samples", 10 ** 6), "--val-samples"),
    (("train", "--data", "hr", "--crop-uses", 10 ** 20), "--crop-uses"),
    (("train", "--data", "hr", "--stage", "trunk", "--batch", 10 ** 5), "--batch 100000"),
    (("train", "--data", "hr", "--out", "run", "--resume", "--overwrite"), "choose one"),
    (("train", "--data", "hr", "--out", "run", "--resume", "--init", "tiny.safetensors"), "choose one"),
    (("train", "--data", "hr", "--out", "hr"), "a folder of this run's images"),
])
def test_the_sweeps_bounds_are_one_line_each(tmp_path, checkpoint, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 64, 64)
    write_png(tmp_path / "in.png", 16, 16)
    (tmp_path / "tiny.safetensors").write_bytes(checkpoint.read_bytes())
    before = sorted(p.name for p in (tmp_path / "hr").iterdir())
    result = run(*args, *(("--scale", 2, "--weights", "tiny.safetensors") if args[0] != "train" else ()),
                 *(("--device", "cpu") if args[0] == "train" else ()))
    assert result.exit_code == 2, result.output
    one_error_line(result, fragment)
    assert sorted(p.name for p in (tmp_path / "hr").iterdir()) == before


def test_a_launcher_size_past_any_cluster_is_one_line(tmp_path, checkpoint):
    args = ["upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out"]
    result = CliRunner().invoke(main, [str(a) for a in args], env={"RANK": "0", "WORLD_SIZE": "9" * 23})
    assert result.exit_code == 2
    one_error_line(result, "WORLD_SIZE")


def test_train_keeps_a_log_it_did_not_write(tmp_path, checkpoint):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"mine": 1}\n')
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2))
    assert result.exit_code == 2
    one_error_line(result, "log.jsonl", "--overwrite")
    assert (out / "log.jsonl").read_text() == '{"mine": 1}\n'


# --- the second sweep ---------------------------------------------------------------------------------------------

def test_train_keeps_files_of_the_users_that_look_like_temporaries(tmp_path, checkpoint):
    out = tmp_path / "run"
    out.mkdir()
    mine = {".notes.tmp": "my notes", ".tmpABC123": "keep"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2)).exit_code == 0
    assert {name: (out / name).read_text() for name in mine} == mine


def test_a_second_train_into_a_running_ones_folder_is_refused(tmp_path, checkpoint):
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "refsr_cli", *map(str, train_args(
        tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--steps", 100000,
        "--save-every", 1))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "last.state.safetensors").exists():
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "refsr_cli", "train", "--data", str(tmp_path / "photos"),
                                 "--out", str(out), "--overwrite", "--scale", "2", "--steps", "1", "--device", "cpu",
                                 "-q"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another refsr train is running there" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on, its files its own
    finally:
        first.kill()
        first.communicate()


def test_resume_with_a_fifo_for_a_log_is_refused_not_waited_on(tmp_path):
    import os
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    (out / "log.jsonl").unlink()
    os.mkfifo(out / "log.jsonl")
    with pytest.raises(RefsrError, match="log.jsonl: not a regular file"):
        fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1, resume=True))


@pytest.mark.parametrize("key, value", [("step", "-5"), ("step", "\u0663"), ("step", "9" * 26),
                                        ("param_groups", "nan"), ("param_groups", "betas"), ("scaler", "inf")])
def test_a_training_state_with_numbers_no_run_writes_is_refused_on_resume(tmp_path, key, value):
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    state = out / "last.state.safetensors"
    meta = read_metadata(state)
    if key == "param_groups":
        groups = json.loads(meta[key])
        groups[0]["lr_scale" if value == "nan" else "betas"] = float("nan") if value == "nan" else [1e308, 0.99]
        meta[key] = json.dumps(groups)
    elif key == "scaler":
        meta[key] = json.dumps({"scale": float("inf")})
    else:
        meta[key] = value
    save_file(load_file(str(state)), str(state), metadata=meta)
    with pytest.raises(RefsrError, match="last.state.safetensors is a damaged training state"):
        fit(trunk_options(data, out, scales=(2,), steps=3, save_every=1, resume=True))


def test_resume_at_or_past_its_steps_says_so(tmp_path):
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1))
    with pytest.raises(RefsrError, match="at step 2 already; give --steps above it"):
        fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1, resume=True))


@pytest.mark.parametrize("changes, fragment", [
    ({"references": [], "references_sha256": []}, "--match without references"),
    ({"references": ["ref.png"], "references_sha256": ["0"], "temperature": 1.0}, "--match without references"),
    ({"command": "walk", "frames": 3, "temperature": 1.0, "from": {"reference": "ref.png"}, "to": {"seed": 3}},
     "from a reference to a seed"),
    ({"command": "walk", "frames": 3, "from": {"seed": 1}, "to": {"seed": 3}}, "between seeds at temperature 0"),
    ({"command": "sample", "seeds": [2, 3, 5], "temperature": 1.0}, "seeds that are not"),
    ({"command": "walk", "frames": 3, "temperature": 1.0, "from": {"seed": 1}, "to": {"seed": 3}, "animate": "gif",
      "sheet": ["a"]}, "an animation and a contact sheet"),
    ({"input": ""}, "'input' names no file"),
    # sweep 17a: names and walks no command line writes, whose redo was refused or made another file
    ({"input": "a\0b.png"}, "'input' names no file"),
    ({"command": "walk", "frames": 3, "temperature": 0, "from": {"reference": ""}, "to": {"reference": "b.png"}},
     "'from' names no file"),
    ({"references": [""], "references_sha256": ["0"]}, "'references' names no file"),
    ({"command": "sample", "reference_list": ["a.png", " "], "sheet": ["a", "b"]}, "'reference_list' names no file"),
    ({"command": "walk", "frames": 3, "temperature": 1.0, "from": {"seed": 1}, "to": {"seed": 1}},
     "a walk from one end to itself"),
    ({"command": "walk", "frames": 3, "temperature": 0, "from": {"reference": "a.png"}, "to": {"reference": "a.png"}},
     "a walk from one end to itself"),
    ({"command": "walk", "frames": 3, "temperature": 0, "from": {"reference": "a.png", "reference_sha256": "1"},
      "to": {"reference": "b.png", "reference_sha256": "1"}}, "a walk from one end to itself"),
    ({"command": "walk", "frames": 3, "frame": 5, "temperature": 1.0, "from": {"seed": 1}, "to": {"seed": 2}},
     "past the walk's frames"),
    ({"command": "walk", "frames": 3, "frame": 1, "temperature": 1.0, "from": {"seed": 1}, "to": {"seed": 2},
      "sheet": ["a"]}, "a walk's frame in a contact sheet"),
    ({"frame": 1}, "'frame' in a record of 'upscale'"),
    # sweep 18a: sheets whose redo is refused or makes other tiles, keys another command's redo drops, a format that
    # is not the file's
    ({"references": ["r.png"], "references_sha256": ["0"], "match_map": True, "sheet": ["a"]},
     "a --match-map and a contact sheet"),
    ({"command": "sample", "temperature": 1.0, "seeds": list(range(101)), "sheet": ["x"] * 101},
     "a contact sheet of 101 labels for 101 tiles"),
    ({"command": "walk", "frames": 101, "temperature": 1.0, "from": {"seed": 1}, "to": {"seed": 2},
      "sheet": ["x", "y"]}, "a contact sheet of 2 labels for 101 tiles"),
    ({"command": "sample", "temperature": 1.0, "seeds": [0, 1, 2]}, "seeds or references without its labels"),
    ({"command": "sample", "temperature": 0, "references": ["r.png"], "references_sha256": ["0"]},
     "'references' in a record of 'sample'"),
    ({"map": True}, "a --match-map without --match's references"),
    ({"format": "tiff"}, "describes a TIFF file, and this one is a PNG"),
    # sweep 19a: a map the redo would not make; a reference the redo's expansion would take once
    ({"references": ["r.png"], "references_sha256": ["0"], "map": True, "match_map": False}, "says no --match-map"),
    ({"references": ["r.png", "r.png"], "references_sha256": ["0", "0"]}, "a reference named twice in its 'references'"),
    ({"command": "sample", "temperature": 1.0, "seeds": [0, 1], "reference_list": ["a.png", "a.png"],
      "sheet": ["1", "2", "3", "4"]}, "a reference named twice in its 'reference_list'"),
    ({"references": ["r.png"], "references_sha256": ["0"], "reference_list": ["a.png", "b.png"],
      "sheet": ["--match", "--match"]}, "--match's references and a sheet's list of references"),
    # sweep 20a: keys no refsr writes, which info printed beside (or, with --json, over) its own "redo" and "file"
    ({"redo": "rm -rf ~"}, "holds 'redo', a key refsr does not write"),
    ({"file": "elsewhere.png"}, "holds 'file', a key refsr does not write"),
    ({"command": "walk", "frames": 3, "temperature": 1.0, "from": {"seed": 1, "note": "x"}, "to": {"seed": 2}},
     "neither a seed nor a reference"),
])
def test_info_refuses_records_no_command_line_writes(tmp_path, checkpoint, changes, fragment):
    result = run("info", image_with_record(tmp_path, checkpoint, changes))
    assert result.exit_code == 1
    one_error_line(result, "bad.png", fragment)


def test_redo_commands_keep_max_pixels(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "in.png", 16, 16)
    assert run("upscale", "in.png", "--max-pixels", 1000, "--scale", 2, "--weights", checkpoint, "-o", "a",
               "-q").exit_code == 0
    assert "--max-pixels 1000" in json.loads(run("info", "a/in_x2.png", "--json").stdout)["redo"]


def test_one_bad_eval_image_or_empty_name_is_one_line(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "tiny.png", 8, 8)
    write_png(tmp_path / "in.png", 16, 16)
    result = run("eval", "hr", "--scale", 2, "--weights", checkpoint, "--device", "cpu")
    assert result.exit_code == 2
    one_error_line(result, "tiny.png", "too small")
    result = run("upscale", "", "--scale", 2, "--weights", checkpoint, "-o", "out")
    assert result.exit_code != 0 and "an empty name" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --- the third sweep ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "folder", "log-link", "lock-with-data"])
def test_train_refuses_a_lock_or_log_that_is_not_a_plain_file(tmp_path, checkpoint, kind):
    import os
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    if kind == "fifo":
        os.mkfifo(out / ".refsr-train.lock")
    elif kind == "folder":
        (out / ".refsr-train.lock").mkdir()
    elif kind == "lock-with-data":  # a file of the user's by that name: taken as the lock, and removed at the end
        (out / ".refsr-train.lock").write_text("keep")
    else:
        (out / "log.jsonl").symlink_to(tmp_path / "elsewhere" / "p9.png")  # dangling
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2))
    assert result.exit_code == 2, result.output
    one_error_line(result, *(["log.jsonl: a link"] if kind == "log-link" else []))  # (it read "not a regular file")
    assert list((tmp_path / "elsewhere").iterdir()) == []
    if kind == "lock-with-data":
        assert (out / ".refsr-train.lock").read_text() == "keep"


# --- the third sweep's rest ----------------------------------------------------------------------------------------

def test_train_keeps_a_checkpoint_another_process_writes_while_it_runs(tmp_path, checkpoint, monkeypatch):
    from refsr_cli.stages import TextureStage
    real, steps = TextureStage.losses, []

    def losses(self, step):
        steps.append(step)
        if step == 1:  # after step 1's save: someone else's file at the checkpoint's name
            (tmp_path / "run" / "last.safetensors").write_bytes(b"someone else's weights")
        return real(self, step)

    monkeypatch.setattr(TextureStage, "losses", losses)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--steps", 3,
                             "--save-every", 1))
    assert result.exit_code == 2
    one_error_line(result, "last.safetensors", "changed", "kept")
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == b"someone else's weights"
    assert read_metadata(tmp_path / "run" / "last.state.safetensors")["step"] == "1"  # nor the state moved on


def test_an_input_whose_name_fills_a_file_name_is_upscaled(tmp_path, checkpoint):
    # 240 bytes of stem (in two-byte characters, cut by bytes never within one): the output's name fits in 255, and
    # so must its temporary file's.
    stem = "é" * 115 + "abcdefghij"
    lr = write_png(tmp_path / f"{stem}.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{stem}_x2.png"]
    too_long = write_png(tmp_path / f"{'b' * 250}.png")  # b..b_x2.png would be 255 + 2 bytes
    result = run("upscale", too_long, lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out2", "-q")
    assert result.exit_code == 1
    one_error_line(result, "257 bytes", "255")
    assert [p.name for p in (tmp_path / "out2").iterdir()] == [f"{stem}_x2.png"]  # and the batch went on


def test_colliding_stems_are_told_apart_by_the_folders_they_do_not_share(tmp_path, checkpoint):
    from refsr_cli.images import unique_stems
    for folder in ("x/day", "y/day", "z"):
        (tmp_path / folder).mkdir(parents=True)
        write_png(tmp_path / folder / "a.png")
    write_png(tmp_path / "z" / "a.jpg")
    paths = [tmp_path / "x/day/a.png", tmp_path / "y/day/a.png", tmp_path / "z/a.png", tmp_path / "z/a.jpg"]
    assert unique_stems(paths) == ["x-day-a", "y-day-a", "z-a-png", "z-a-jpg"]  # never tmp_path's folders
    assert unique_stems([tmp_path / "z/a.png", tmp_path / "z/a.jpg"]) == ["a-png", "a-jpg"]


@pytest.mark.parametrize("args", [("info", "{output}"), ("info", "--json", "{output}"), ("--help",), ("eval", "--help"),
                                  ("--version",), ("upscale", "{lr}", "--json", "-o", "{out}")])
def test_stdout_on_a_full_disk_is_one_line_and_no_traceback(tmp_path, checkpoint, args):
    import subprocess
    import sys
    lr = write_png(tmp_path / "in.png")
    made = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "made", "-q")
    assert made.exit_code == 0
    words = [a.format(output=tmp_path / "made" / "in_x2.png", lr=lr, out=tmp_path / "out") for a in args]
    if words[0] == "upscale":
        words += ["--scale", "2", "--weights", str(checkpoint)]
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "refsr_cli", *words], stdout=full, stderr=subprocess.PIPE,
                                text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "refsr: error: cannot write to standard output (No space left on device)"
    if words[0] == "upscale":  # what was written stays written
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["in_x2.png"]


def test_a_closed_pipe_stops_a_batch_quietly_and_keeps_what_was_written(tmp_path, checkpoint):
    import os
    import subprocess
    import sys
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        write_png(tmp_path / "in" / f"{name}.png")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line (`| head -0`)
    result = subprocess.run([sys.executable, "-m", "refsr_cli", "upscale", str(tmp_path / "in"), "--json",
                             "--scale", "2", "--weights", str(checkpoint), "-o", str(tmp_path / "out")],
                            stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert result.returncode == 1 and result.stderr == ""  # as quiet as any tool whose reader left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_x2.png"]  # written, and not called a failure
    again = run("upscale", tmp_path / "in", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out",
                "--skip-existing", "-q")
    assert again.exit_code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "b_x2.png"]


def test_names_holding_a_newline_give_one_line_errors(tmp_path, checkpoint):
    lr = write_png(tmp_path / "two\nlines.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "two\nlines_x2.png").write_bytes(b"kept")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    one_error_line(result, "two\\nlines_x2.png", "exists")
    result = run("upscale", tmp_path / "no\nsuch.png", "--scale", 2, "--weights", checkpoint, "-q")
    one_error_line(result, "no\\nsuch.png")
    result = run("info", tmp_path / "out" / "two\nlines_x2.png")
    one_error_line(result, "two\\nlines_x2.png")


@pytest.mark.parametrize("out", ["-", ""])
def test_an_output_that_names_no_file_is_refused(tmp_path, checkpoint, out):
    lr = write_png(tmp_path / "in.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out)
    assert result.exit_code == 2
    one_error_line(result, "-o")


def test_a_dangling_link_at_an_output_name_is_an_existing_output(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in_x2.png").symlink_to(tmp_path / "nowhere.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    one_error_line(result, "in_x2.png exists", "--overwrite")
    assert not (tmp_path / "nowhere.png").exists()


def test_a_record_holding_a_number_past_int_conversion_is_a_damaged_record(tmp_path, checkpoint):
    from PIL import Image, PngImagePlugin
    bad = image_with_record(tmp_path, checkpoint, {"seed": 7})
    info = PngImagePlugin.PngInfo()  # 6000 digits: json.dumps itself cannot write it, int() cannot read it
    info.add_text("refsr", Image.open(bad).info["refsr"].replace('"seed": 7', '"seed": ' + "9" * 6000))
    Image.new("RGB", (4, 4)).save(bad, pnginfo=info)
    result = run("info", bad)
    assert result.exit_code == 1
    one_error_line(result, "bad.png", "6000 digits")


def test_a_hugging_face_cache_that_cannot_be_a_folder_is_named_as_the_cache(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "hf").write_text("a file where the cache's folder would be")
    lr = write_png(tmp_path / "in.png")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "refsr_cli", "upscale", str(lr), "--weights", "someone/model",
                             "--scale", "2", "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Hugging Face cache" in result.stderr and "HF_HOME" in result.stderr
    assert "HF_HUB_OFFLINE" not in result.stderr  # which would not help


def test_refsr_alone_shows_its_help_laid_out(tmp_path):
    result = run()
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: ") and "\n  upscale " in result.stderr  # (CliRunner calls it main)


@pytest.mark.parametrize("closed", [1, 2])
def test_a_closed_stdout_or_stderr_is_no_traceback_and_the_work_is_done(tmp_path, checkpoint, closed):
    import os
    import subprocess
    import sys
    lr = write_png(tmp_path / "in.png")
    log = tmp_path / "what-it-said.txt"  # the other stream, kept open, to see what was said
    with open(log, "w") as other:
        result = subprocess.run([sys.executable, "-m", "refsr_cli", "upscale", str(lr), "--scale", "2",
                                 "--weights", str(checkpoint), "-o", str(tmp_path / "out"),
                                 *(["--json"] if closed == 1 else [])],  # else messages, on the closed stderr
                                stdout=other if closed == 2 else None, stderr=other if closed == 1 else None,
                                preexec_fn=lambda: os.close(closed))
    said = log.read_text()
    assert "Traceback" not in said
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["in_x2.png"]
    if closed == 1:  # the JSON line had nowhere to go: said, and not called a failure of the file
        assert result.returncode == 1 and said == "refsr: error: cannot write to standard output (it is closed)\n"
    else:  # "wrote ..." and the summary have nowhere to go: the work is done all the same
        assert result.returncode == 0 and said == ""


def test_eval_with_a_closed_stdout_still_writes_its_json(tmp_path, checkpoint):
    import os
    import subprocess
    import sys
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 32, 32)
    result = subprocess.run([sys.executable, "-m", "refsr_cli", "eval", str(tmp_path / "hr"), "--scale", "2",
                             "--weights", str(checkpoint), "--device", "cpu", "--json", str(tmp_path / "m.json")],
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert result.returncode == 1
    assert result.stderr == "refsr: error: cannot write to standard output (it is closed)\n"
    assert json.loads((tmp_path / "m.json").read_text())["rows"]


def test_train_without_quiet_says_what_it_wrote(tmp_path, checkpoint):
    args = [a for a in train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2) if a != "-q"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {tmp_path / 'run' / 'last.safetensors'}"


# --- the fourth sweep ----------------------------------------------------------------------------------------------

def refsr_process(*args, env=None, **kwargs):
    """refsr in a process of its own (for what CliRunner cannot give: closed or full streams, the environment
    huggingface_hub reads on import)."""
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "refsr_cli", *map(str, args)], env=os.environ | (env or {}),
                          **({"capture_output": True, "text": True} | kwargs))


def test_bmp_outputs_are_refused_since_they_cannot_carry_the_record(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "--format", "bmp", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "'bmp' is not one of" in result.stderr
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out.bmp")
    assert result.exit_code == 2
    one_error_line(result, "BMP", "record")
    assert not (tmp_path / "out.bmp").exists()


def test_a_gif_output_name_says_how_a_walk_animation_is_asked_for(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    result = run("walk", lr, "--seed", 1, "--seed", 2, "--steps", 2, "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "anim.gif")
    assert result.exit_code == 2
    one_error_line(result, "anim.gif", "--animate gif")  # (it read "unknown output format")
    assert not (tmp_path / "anim.gif").exists()


@pytest.mark.parametrize("removed, kept, fragment", [
    ("in_x2_match_map.png", "in_x2_match.png", "kept by --skip-existing"),  # a map written beside another's image
    ("in_x2_match.png", "in_x2_match_map.png", "another run's images")])  # an image written beside another's map
def test_a_match_map_and_its_image_are_never_of_two_runs(tmp_path, checkpoint, removed, kept, fragment):
    lr = write_png(tmp_path / "in.png", 24, 24)
    refs = [write_png(tmp_path / f"r{i}.png", 32, 32, seed=5 + i) for i in range(2)]
    out = tmp_path / "out"
    args = ("--match", "--match-map", "--scale", 2, "--weights", checkpoint, "-o", out, "-q")
    assert run("upscale", lr, "--ref", refs[0], *args).exit_code == 0
    (out / removed).unlink()
    result = run("upscale", lr, "--ref", refs[1], *args, "--skip-existing")  # what is kept is of r0, not r1
    assert result.exit_code == 1
    one_error_line(result, kept, fragment)
    assert not (out / removed).exists()
    assert run("upscale", lr, "--ref", refs[0], *args, "--skip-existing").exit_code == 0  # its own run: made
    assert (out / removed).exists()


def test_a_full_stderr_does_not_stop_a_batch(tmp_path, checkpoint):
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        write_png(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    with open("/dev/full", "w") as full:
        result = refsr_process("upscale", tmp_path / "in", "--scale", 2, "--weights", checkpoint, "-o",
                               tmp_path / "out", stderr=full, capture_output=False)
    assert result.returncode == 1  # broken.png failed, and could not say so
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "b_x2.png", "c_x2.png"]


@pytest.mark.parametrize("damage", ["lfs-pointer", "other-tensors"])
def test_a_damaged_backbone_file_is_one_line(tmp_path, checkpoint, monkeypatch, damage):
    copy = linked_weights(tmp_path, monkeypatch)
    (copy / "vgg16_relu4_1.safetensors").unlink()
    if damage == "lfs-pointer":
        (copy / "vgg16_relu4_1.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    else:
        save_file({"zzz": torch.zeros(3)}, str(copy / "vgg16_relu4_1.safetensors"))
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "-o",
                 tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "vgg16_relu4_1", "reinstall refsr")


@pytest.mark.parametrize("answer", [b"{}", b"[1, 2, 3]"])
def test_a_server_that_is_not_the_hub_is_one_line_for_download_and_push(tmp_path, checkpoint, answer):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotTheHub(BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_POST = do_HEAD = do_PUT = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotTheHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_TOKEN": "hf_test"}
    try:
        pushed = refsr_process("push", checkpoint, "me/repo", env=env)
        loaded = refsr_process("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "me/repo",
                               "-o", tmp_path / "out", env=env)
    finally:
        server.shutdown()
    for result in (pushed, loaded):
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("refsr: error: "), result.stderr


@pytest.mark.parametrize("value, fragment", [("10000000000", "too large"), ("-5", "HF_* environment")])
def test_a_hub_timeout_no_socket_takes_is_one_line(tmp_path, value, fragment):
    result = refsr_process("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "me/repo",
                           env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": value,
                                "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_a_fifo_or_device_at_an_output_name_is_refused_even_with_overwrite(tmp_path, checkpoint):
    import os
    os.mkfifo(tmp_path / "fifo.png")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 32, 32)
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "fifo.png", "--overwrite", "-q")
    assert result.exit_code == 1
    one_error_line(result, "fifo.png", "not a regular file")
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--json", tmp_path / "fifo.json",
                 "--overwrite")
    assert result.exit_code == 2
    one_error_line(result, "fifo.json", "not a regular file")
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--json", "/dev/null", "--overwrite")
    assert result.exit_code == 2 and Path("/dev/null").is_char_device()
    assert (tmp_path / "fifo.png").is_fifo() and (tmp_path / "fifo.json").is_fifo()


def linked_weights(tmp_path, monkeypatch) -> Path:
    """A weights folder of links to the shipped files, which refsr is pointed at: a test of what must not write
    there cannot damage the checkout when it fails (a write replaces a link, not the file)."""
    from refsr_cli import checkpoint, evaluate
    copy = tmp_path / "weights"
    copy.mkdir()
    for path in checkpoint.weights_dir().glob("*.safetensors"):
        (copy / path.name).symlink_to(path)
    monkeypatch.setattr(checkpoint, "weights_dir", lambda: copy)
    monkeypatch.setattr(evaluate, "weights_dir", lambda: copy)
    return copy


def test_eval_never_writes_its_json_into_refsrs_weights_folder(tmp_path, checkpoint, monkeypatch):
    weights = linked_weights(tmp_path, monkeypatch)
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 32, 32)
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--json",
                 weights / "lpips_alex.safetensors", "--overwrite")
    assert result.exit_code == 2
    one_error_line(result, "weights folder")
    assert all(p.is_symlink() for p in weights.iterdir())


def test_a_redo_command_names_a_file_with_a_newline_as_bash_reads_it(tmp_path, checkpoint, monkeypatch):
    import subprocess
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "two\nlines.png")
    assert run("upscale", "two\nlines.png", "--scale", 2, "--weights", checkpoint, "-o", "a", "-q").exit_code == 0
    result = run("info", "a/two\nlines_x2.png")
    redo = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("redo"))
    command = redo.split(None, 1)[1]
    assert "\n" not in command
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True).stdout
    words = words.split("\0")[:-1]
    assert words[:3] == ["refsr", "upscale", "two\nlines.png"]
    assert run(*words[1:], "-o", "b", "-q").exit_code == 0
    assert (tmp_path / "b" / "two\nlines_x2.png").read_bytes() == (tmp_path / "a" / "two\nlines_x2.png").read_bytes()


def test_eval_on_a_flat_image_writes_strict_json(tmp_path, checkpoint):
    from PIL import Image
    (tmp_path / "hr").mkdir()
    Image.new("RGB", (48, 48), (120, 130, 140)).save(tmp_path / "hr" / "flat.png")
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--samples", 2, "--json",
                 tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    strict = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert strict["means"]["samples"]["diversity"] == 0.0


@pytest.mark.parametrize("args", [("--seed", "\u0663"), ("--tile", "1_000"), ("--strength", "\u0661"),
                                  ("--temperature", "1_0"), ("--max-pixels", "\uff11\uff10\uff10")])
def test_numbers_of_other_scripts_digits_or_underscores_are_refused(tmp_path, checkpoint, args):
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, *args,
                 "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, args[0])
    assert not (tmp_path / "out").exists()


def test_a_reference_folder_that_is_also_the_output_folder_runs_again(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    (tmp_path / "st").mkdir()
    write_png(tmp_path / "st" / "r0.png", 32, 32, seed=4)
    args = ("--ref", tmp_path / "st", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "st", "-q")
    assert run("upscale", lr, *args).exit_code == 0
    result = run("upscale", lr, *args, "--skip-existing")  # in_x2_r0.png is an output, not a second reference
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["in_x2_r0.png", "r0.png"]


def test_the_fourth_sweeps_messages_say_what_is_wrong(tmp_path, checkpoint, monkeypatch):
    import os
    from PIL import Image
    from refsr_cli import train
    from refsr_cli.report import Terminated
    (tmp_path / "tiny").mkdir()
    write_png(tmp_path / "tiny" / "t.png", 10, 10)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--val",
                             tmp_path / "tiny"))
    one_error_line(result, "--val")
    def terminated(*args):  # SIGTERM before the first save
        raise Terminated()

    monkeypatch.setattr(train, "run", terminated)
    (tmp_path / "second").mkdir()
    result = run(*train_args(tmp_path / "second", "--init", checkpoint))
    assert result.exit_code == 143
    one_error_line(result, "terminated before the run's first checkpoint")
    lr = write_png(tmp_path / "in.png")
    ref = write_png(tmp_path / "r.png", 32, 32)
    result = run("walk", lr, "--ref", ref, "--ref", ref, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "w")
    one_error_line(result, "two different", "named twice")
    Image.new("RGB", (8200, 8)).save(tmp_path / "wide.png")
    result = run("upscale", tmp_path / "wide.png", "--scale", 2, "--weights", checkpoint, "--format", "webp",
                 "-o", tmp_path / "webp", "-q")
    assert result.exit_code == 1
    one_error_line(result, "16400x16", "WEBP", "16383")
    os.mkfifo(tmp_path / "fifo.safetensors")
    result = run("push", tmp_path / "fifo.safetensors", "me/repo")
    assert result.exit_code == 2
    one_error_line(result, "not a regular file")


def test_info_reports_a_folder_and_goes_on_and_keeps_the_records_command(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q").exit_code == 0
    result = run("info", tmp_path / "out", tmp_path / "out" / "in_x2.png", "--json")
    assert result.exit_code == 1
    one_error_line(result, "out")
    record = json.loads(result.stdout)
    assert record["command"] == "upscale" and record["redo"].startswith("refsr upscale ")


def test_a_train_refused_before_its_first_save_leaves_no_empty_folder(tmp_path, checkpoint):
    (tmp_path / "no-refs").mkdir()
    result = run(*train_args(tmp_path, "--init", checkpoint, "--refs", tmp_path / "no-refs"))
    assert result.exit_code == 2
    one_error_line(result)
    assert not (tmp_path / "run").exists()


# --- the fifth sweep -----------------------------------------------------------------------------------------------

def test_train_stops_when_its_log_is_replaced_and_keeps_the_other_file(tmp_path, checkpoint, monkeypatch):
    import os
    from refsr_cli.stages import TextureStage
    real = TextureStage.losses

    def losses(self, step):
        if step == 1:  # after step 1's row: another process puts its own file at log.jsonl
            (tmp_path / "theirs.tmp").write_text('{"note": "mine"}\n')
            os.replace(tmp_path / "theirs.tmp", tmp_path / "run" / "log.jsonl")
        return real(self, step)

    monkeypatch.setattr(TextureStage, "losses", losses)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--steps", 3,
                             "--log-every", 1))
    assert result.exit_code == 2
    one_error_line(result, "log.jsonl", "changed")
    assert (tmp_path / "run" / "log.jsonl").read_text() == '{"note": "mine"}\n'


def test_a_reference_replaced_while_it_is_read_is_refused_not_recorded_under_the_new_hash(tmp_path, checkpoint,
                                                                                          monkeypatch):
    from refsr_cli import batch
    real = batch.read_rgb
    ref, other = write_png(tmp_path / "ref.png", 32, 32, seed=1), write_png(tmp_path / "other.png", 32, 32, seed=2)

    def replaced_after_reading(path, *args):
        image = real(path, *args)
        other.replace(ref)
        return image

    monkeypatch.setattr(batch, "read_rgb", replaced_after_reading)
    result = run("upscale", write_png(tmp_path / "in.png"), "--ref", ref, "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "ref.png", "changed while it was read")


def test_an_animation_is_not_made_of_a_frame_replaced_after_it_was_written(tmp_path, checkpoint, monkeypatch):
    from PIL import Image
    from refsr_cli import batch
    real = batch.write_picture

    def intruding(array, path, *args, **kwargs):
        real(array, path, *args, **kwargs)
        if Path(path).name == "in_x2_walk001.png":  # frame 0 is written; someone puts a red image in its place
            Image.new("RGB", (32, 32), (255, 0, 0)).save(Path(path).parent / "in_x2_walk000.png")

    monkeypatch.setattr(batch, "write_picture", intruding)
    result = run("walk", write_png(tmp_path / "in.png"), "--seed", 1, "--seed", 2, "--steps", 3, "--animate", "gif",
                 "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "w", "-q")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_walk000.png", "changed since this run wrote it")
    assert not (tmp_path / "w" / "in_x2_walk.gif").exists()


def test_a_licence_that_is_not_an_id_is_refused_before_any_request(tmp_path, checkpoint):
    result = refsr_process("push", checkpoint, "me/repo", "--license", "mit\nlibrary_name: evil",
                           env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
                                "HF_TOKEN": "hf_x"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--license" in result.stderr and "licence id" in result.stderr


def test_names_the_system_refuses_are_one_line_wherever_they_are_given(tmp_path, checkpoint):
    import os
    lr = write_png(tmp_path / "in.png")
    long = str(tmp_path / ("x" * 256))
    result = run("upscale", lr, long + ".png", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    one_error_line(result, "File name too long")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["in_x2.png"]  # the other input is done
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 32, 32)
    os.symlink("loop.png", tmp_path / "loop.png")
    for args in (("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", long + ".png"),
                 ("upscale", lr, "--scale", 2, "--weights", long + ".safetensors", "-o", tmp_path / "o2"),
                 ("upscale", lr, "--ref", long + ".png", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o2"),
                 ("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--json", long + ".json"),
                 ("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "loop.png"),
                 ("upscale", lr, "--ref", tmp_path / "loop.png", "--scale", 2, "--weights", checkpoint)):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        one_error_line(result)
        assert "internal error" not in result.stderr, args
    (tmp_path / "o4").mkdir()
    os.symlink("x.png", tmp_path / "o4" / "in_x2.png")
    os.symlink("in_x2.png", tmp_path / "o4" / "x.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o4", "--overwrite", "-q")
    assert result.exit_code == 1
    one_error_line(result, "loop of symbolic links")


def test_a_hub_endpoint_with_no_port_a_socket_takes_is_one_line(tmp_path):
    result = refsr_process("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "me/repo",
                           env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:99999"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "HF_" in result.stderr, result.stderr


@pytest.mark.parametrize("env, fragment", [({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
                                           ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": "abc"}, "MASTER_PORT")])
def test_train_under_a_hand_made_launcher_environment_names_what_is_missing(tmp_path, checkpoint, monkeypatch,
                                                                            env, fragment):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run(*train_args(tmp_path, "--init", checkpoint))
    assert result.exit_code == 2
    one_error_line(result, fragment)


def test_resume_drops_a_log_row_nested_deep_and_goes_on(tmp_path, checkpoint):
    args = train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--save-every", 1)
    assert run(*args).exit_code == 0
    with open(tmp_path / "run" / "log.jsonl", "a") as log:
        log.write("[" * 100000 + "]" * 100000 + "\n")
    resumed = [a for a in args if a not in ("--init", checkpoint)]
    result = run(*resumed[:resumed.index("--steps")], "--steps", 2, *resumed[resumed.index("--steps") + 2:],
                 "--resume")
    assert result.exit_code == 0, result.output
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_a_run_folder_removed_mid_train_is_one_line_not_an_internal_error(tmp_path, checkpoint, monkeypatch):
    import shutil
    from refsr_cli.stages import TextureStage
    real = TextureStage.losses

    def losses(self, step):
        if step == 1:
            shutil.rmtree(tmp_path / "run")
        return real(self, step)

    monkeypatch.setattr(TextureStage, "losses", losses)
    result = run(*train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2, "--steps", 3,
                             "--save-every", 1))
    assert result.exit_code == 2
    one_error_line(result)
    assert "internal error" not in result.stderr


@pytest.mark.parametrize("args, fragment", [(("--max-pixels", "1" + "0" * 49), "more than 20 digits"),
                                            (("--tile-pad", "9" * 46), "more than 20 digits"),
                                            (("--format", "jpg", "-o", "res.png"), "disagree")])
def test_flags_a_record_could_not_hold_or_that_contradict_are_refused(tmp_path, checkpoint, monkeypatch, args,
                                                                      fragment):
    monkeypatch.chdir(tmp_path)
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, *args)
    assert result.exit_code == 2
    one_error_line(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "tiny-x2.safetensors"]


def test_a_bad_launcher_rank_is_refused_even_with_shard(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("RANK", "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "--shard", "0/1",
                 "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "RANK")


# --- the sixth sweep -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, fragment", [
    (lambda up, lr: up.upscale(lr, [Texture(up.texture_bank(), seed=3, temperature=1.0, strength=float("nan"))]),
     "strength"),
    (lambda up, lr: Texture(up.texture_bank(), strength=1e308), "strength"),
    (lambda up, lr: Texture(up.texture_bank(), temperature=float("inf")), "temperature"),
    (lambda up, lr: Texture(up.texture_bank(), seed=2 ** 70), "seed"),
    (lambda up, lr: up.upscale(np.full_like(lr, np.nan), [None]), "not finite"),
    (lambda up, lr: up.prior_z(1, float("nan")), "temperature"),
    (lambda up, lr: up.reference_bank(np.full((40, 40, 3), np.nan, np.float32)), "not finite"),
    (lambda up, lr: up.upscale(lr, []), "latents"),
    (lambda up, lr: up.upscale(lr[..., 0], [None]), "HxWx3"),
    (lambda up, lr: up.upscale(lr[:2, :2], [None]), "too small"),
    (lambda up, lr: Upscaler.from_weights(scale=2, options=EngineOptions(tile=0)), "tile"),
    (lambda up, lr: Upscaler.from_weights(scale=2, options=EngineOptions(tile_pad=-5)), "tile_pad"),
    (lambda up, lr: Upscaler.from_weights(scale=2, options=EngineOptions(device="tpu")), "device"),
])
def test_the_python_api_refuses_what_the_flags_refuse(call, fragment):
    from PIL import Image
    from refsr_cli.errors import RefsrError
    up = Upscaler.from_weights(scale=2)
    lr = np.asarray(Image.new("RGB", (24, 24), (90, 120, 150)), np.float32) / 255
    with pytest.raises(RefsrError, match=fragment):
        call(up, lr)


def test_eval_json_must_name_a_file(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", 32, 32)
    for name in ("-", ""):
        result = run("eval", "hr", "--scale", 2, "--weights", checkpoint, "--json", name)
        assert result.exit_code == 2
        one_error_line(result, "--json")
    assert not (tmp_path / "-").exists()


def test_eval_unrelated_names_the_image_and_the_reference_that_is_too_small(tmp_path, checkpoint):
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "h0.png", 48, 48)
    write_png(tmp_path / "hr" / "h0b.png", 12, 12, seed=5)  # too small to be measured, and to be h0's reference
    write_png(tmp_path / "hr" / "h1.png", 48, 48, seed=2)
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", checkpoint, "--match-protocol", "unrelated")
    errors = [line for line in result.stderr.splitlines() if line.startswith("refsr: error: ")]
    assert any("h0.png" in line and "h0b.png" in line for line in errors), result.stderr


def test_output_hashes_never_empties_a_folder_of_the_users(tmp_path):
    import subprocess
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    script = Path(__file__).resolve().parent.parent / "scripts" / "output_hashes.sh"
    result = subprocess.run(["bash", str(script), str(tmp_path / "mine")], capture_output=True, text=True,
                            env={"REFSR": "false", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"


# --- the seventh sweep ---------------------------------------------------------------------------------------------

def test_weights_replaced_while_they_are_read_are_refused(tmp_path, checkpoint, monkeypatch):
    from refsr_cli import checkpoint as checkpoints
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(checkpoint.read_bytes())
    real = checkpoints.read_weights

    def replaced_after_reading(path):
        state = real(path)
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        save_file(tensors | {name: tensors[name] * 1.5}, str(path), metadata=read_metadata(path))  # a train's save
        return state

    monkeypatch.setattr(checkpoints, "read_weights", replaced_after_reading)
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", weights, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "w.safetensors", "changed while it was read")


def test_push_sends_the_bytes_it_checked(tmp_path, checkpoint, monkeypatch):
    from refsr_cli import hub
    pushed = tmp_path / "p.safetensors"
    pushed.write_bytes(checkpoint.read_bytes())
    checked = hub.checkpoints_to_push([pushed])
    assert checked[0].data == checkpoint.read_bytes()  # what CommitOperationAdd is given: bytes, not the path
    real = hub.load_weights

    def replaced_after_the_check(path, *args):
        weights = real(path, *args)
        Path(path).write_bytes(b"not a checkpoint")
        return weights

    monkeypatch.setattr(hub, "load_weights", replaced_after_the_check)
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="changed while it was checked"):
        hub.checkpoints_to_push([pushed])


def test_a_launcher_variable_of_thousands_of_digits_names_the_variable(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("RANK", "9" * 5000)
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "RANK=", "5000 characters")


@pytest.mark.parametrize("key", ["tile", "tile_pad", "max_pixels"])
def test_info_refuses_a_record_number_no_flag_takes(tmp_path, checkpoint, key):
    bad = image_with_record(tmp_path, checkpoint, {key: 10 ** 25})
    result = run("info", bad)
    assert result.exit_code == 1
    one_error_line(result, "bad.png", key)


def test_an_input_whose_name_is_not_utf8_is_upscaled(tmp_path, checkpoint):
    import os
    lr = write_png(tmp_path / "in.png")
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.png")
    Path(odd).write_bytes(lr.read_bytes())
    result = run("upscale", odd, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert [os.fsencode(p.name) for p in (tmp_path / "out").iterdir()] == [b"\xff_x2.png"]


# --- the eighth sweep ----------------------------------------------------------------------------------------------

def test_a_jpeg_whose_record_exceeds_its_exif_is_refused_before_the_work(tmp_path, checkpoint):
    deep = tmp_path.joinpath(*["d" * 200] * 14)  # 24 references of 2800-byte names: a record past 64 KB
    deep.mkdir(parents=True)
    for i in range(24):
        write_png(deep / f"r{i:02d}.png", 32, 32, seed=i)
    lr = write_png(tmp_path / "a.png")
    args = ["upscale", lr, "--ref", deep, "--match", "--scale", 2, "--weights", checkpoint, "-q"]
    result = run(*args, "-o", tmp_path / "out.jpg")
    assert result.exit_code == 1
    one_error_line(result, "out.jpg", "EXIF", "PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d" * 200, "tiny-x2.safetensors"]
    result = run(*args, "-o", tmp_path / "out.png")  # a PNG's text chunk holds it
    assert result.exit_code == 0, result.output


def test_a_checkpoint_whose_references_vgg16_cannot_pool_is_refused_at_load(tmp_path, checkpoint):
    from refsr_cli.model import RefVAEConfig
    for size in (1, 4, 7):
        with pytest.raises(ValueError, match="ref_size"):
            RefVAEConfig(ref_size=size)
    meta = read_metadata(checkpoint)
    meta["config"] = json.dumps(json.loads(meta["config"]) | {"ref_size": 4})
    bad = tmp_path / "refsize4.safetensors"
    save_file(load_file(str(checkpoint)), str(bad), metadata=meta)
    result = run("upscale", write_png(tmp_path / "in.png"), "--ref", write_png(tmp_path / "r.png", 32, 32),
                 "--texture", "learned", "--scale", 2, "--weights", bad, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "refsize4.safetensors", "ref_size")


class SentinelSignal(Exception):
    """What a test's own SIGTERM handler raises: refsr's was not in place."""


@pytest.fixture
def sigterm_sentinel():
    """SIGTERM raises SentinelSignal unless refsr installs its own handler; restored after the test."""
    import signal

    def sentinel(signum, frame):
        raise SentinelSignal()

    previous = signal.signal(signal.SIGTERM, sentinel)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_before_a_commands_own_handling_is_one_line(tmp_path, checkpoint, monkeypatch, sigterm_sentinel):
    import signal
    from refsr_cli import batch, provenance
    monkeypatch.setattr(batch, "Reporter", lambda *a: signal.raise_signal(signal.SIGTERM))  # as rich loads
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "-o", tmp_path)
    assert result.exit_code == 143, result.output
    one_error_line(result, "terminated")
    monkeypatch.setattr(provenance, "read_provenance", lambda path: signal.raise_signal(signal.SIGTERM))
    result = run("info", tmp_path / "in.png")  # info had no handler of its own
    assert result.exit_code == 143, result.output
    one_error_line(result, "terminated")


def test_ctrl_c_outside_a_commands_handling_is_one_line_without_a_blank_one(tmp_path, monkeypatch):
    from refsr_cli import provenance

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(provenance, "read_provenance", interrupted)
    result = run("info", write_png(tmp_path / "in.png"))
    assert result.exit_code == 130
    assert result.stderr == "refsr: error: interrupted\n"
    from refsr_cli import cli
    monkeypatch.setattr(cli, "parse_scales", interrupted)  # while the arguments are read
    result = run("train", "--data", tmp_path, "--out", tmp_path / "run", "--stage", "trunk", "--scales", "2")
    assert result.exit_code == 130
    assert result.stderr == "refsr: error: interrupted\n"


@pytest.fixture
def sigint_python_default():
    """SIGINT raises KeyboardInterrupt, as Python starts it (a suite started in the background ignores it)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_c_code_turned_into_its_own_error_still_stops_the_batch(tmp_path, checkpoint, monkeypatch,
                                                                             sigint_python_default):
    import signal
    from refsr_cli import batch
    tried = []

    def converted(report, plan, lr_path, stem):  # as torch's C code can: the KeyboardInterrupt becomes a ValueError
        tried.append(lr_path)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'list'") from None

    monkeypatch.setattr(batch, "upscale_one", converted)
    inputs = [write_png(tmp_path / f"in{i}.png", seed=i) for i in range(3)]
    result = run("upscale", *inputs, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o", "-q")
    assert result.exit_code == 130, result.output
    assert len(tried) == 1  # the batch did not go on past the Ctrl-C
    assert "internal error" not in result.stderr and "interrupted" in result.stderr


@pytest.mark.parametrize("damage, fragment", [
    ("moment", "exp_avg of parameter"), ("module", "lacks or adds 1 tensors"), ("betas", "betas [2.0, 0.99]"),
    ("eps", "eps 0"), ("lr", "lr -1")])
def test_a_training_state_that_does_not_fit_its_run_is_refused_on_resume(tmp_path, damage, fragment):
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import fit
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    state = out / "last.state.safetensors"
    meta, tensors = read_metadata(state), load_file(str(state))
    groups = json.loads(meta["param_groups"])
    if damage == "moment":
        tensors["optimizer.0.exp_avg"] = torch.zeros(3)
    elif damage == "module":
        del tensors[sorted(k for k in tensors if k.startswith("module."))[0]]
    else:
        groups[0][damage] = {"betas": [2.0, 0.99], "eps": 0, "lr": -1}[damage]
    meta["param_groups"] = json.dumps(groups)
    save_file(tensors, str(state), metadata=meta)
    with pytest.raises(RefsrError, match="damaged training state") as caught:
        fit(trunk_options(data, out, scales=(2,), steps=2, save_every=1, resume=True))
    assert fragment in str(caught.value)


def test_a_texture_state_lacking_a_tensor_is_refused_not_started_afresh():
    from refsr_cli.errors import RefsrError
    from refsr_cli.stages import texture_model
    from conftest import tiny_config
    model = tiny_model(2)
    trained = model.trainable_state_dict()
    del trained["to_rgb.weight"]
    with pytest.raises(RefsrError, match="damaged training state.*to_rgb.weight"):
        texture_model(None, {"config": tiny_config(2), "module": trained})


@pytest.mark.parametrize("scale", ["2", 2.0, True, 3])
def test_the_python_apis_scale_is_checked_as_the_flag_is(scale):
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match=f"^scale={scale!r}: give"):
        load_weights(None, scale=scale)
    with pytest.raises(RefsrError, match=f"^scale={scale!r}: give"):
        Upscaler.from_weights(scale=scale)


def test_a_name_ending_in_a_slash_is_never_written_as_a_file(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    common = ["--scale", 2, "--weights", checkpoint, "-q"]
    result = run("upscale", lr, *common, "-o", f"{tmp_path}/results.png/")
    assert result.exit_code == 2
    one_error_line(result, "results.png/", "folder")
    assert not (tmp_path / "results.png").exists()
    (tmp_path / "made.png").mkdir()  # a folder that exists, named like a file: written into
    result = run("upscale", lr, *common, "-o", f"{tmp_path}/made.png/")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "made.png").iterdir()] == ["in_x2.png"]
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "h.png", 32, 32)
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--json", f"{tmp_path}/rows.json/")
    assert result.exit_code == 2
    one_error_line(result, "rows.json/", "folder")
    assert not (tmp_path / "rows.json").exists()


def test_sheet_labels_tell_apart_references_of_one_name(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "r.png", 20, 20, seed=len(folder))
    lr = write_png(tmp_path / "in.png")
    result = run("upscale", lr, "--ref", "d1/r.png", "--ref", "d2/r.png", "--scale", 2, "--weights", checkpoint,
                 "--sheet", "-o", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip())["sheet"] == ["--ref d1/r.png", "--ref d2/r.png"]


def test_a_match_map_may_be_added_later_beside_its_image(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png", 24, 24)
    ref = write_png(tmp_path / "r.png", 32, 32, seed=5)
    out = tmp_path / "out"
    args = ("--ref", ref, "--match", "--scale", 2, "--weights", checkpoint, "-o", out, "-q")
    assert run("upscale", lr, *args).exit_code == 0
    image = (out / "in_x2_match.png").read_bytes()
    result = run("upscale", lr, *args, "--match-map", "--skip-existing")  # the same image, its map added
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["in_x2_match.png", "in_x2_match_map.png"]
    assert (out / "in_x2_match.png").read_bytes() == image


# --- the ninth sweep -----------------------------------------------------------------------------------------------

def test_a_walk_between_one_seed_named_twice_is_refused(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    for seeds in (("3", "3"), ("0", "00")):
        result = run("walk", lr, "--seed", seeds[0], "--seed", seeds[1], "--scale", 2, "--weights", checkpoint,
                     "-o", tmp_path / "w")
        assert result.exit_code == 2
        one_error_line(result, "two different", "named twice")
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").iterdir())


def test_a_small_max_pixels_is_said_in_numbers_that_differ(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png", 32, 32)
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "--max-pixels", 1000, "-o", tmp_path / "o", "-q")
    assert result.exit_code == 1
    one_error_line(result, "is 0.00102 Mpx, over the 0.001 Mpx limit")


def test_a_png_with_a_text_chunk_pillow_does_not_read_is_not_called_corrupt(tmp_path, checkpoint):
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * 20 * 1024 * 1024, zip=True)
    Image.new("RGB", (24, 24)).save(tmp_path / "in.png", pnginfo=info)
    result = run("upscale", tmp_path / "in.png", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o", "-q")
    assert result.exit_code == 1
    one_error_line(result, "in.png", "text chunk larger than Pillow reads")


@pytest.mark.parametrize("args", [("train", "--stage", "trunk", "--scales", "2", "--data", ".", "--out", ""),
                                  ("info", ""), ("push", "", "me/x")])
def test_an_empty_name_is_not_the_current_folder(tmp_path, monkeypatch, args):
    write_png(tmp_path / "in.png")
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    one_error_line(result, "'': an empty name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_empty_weights_are_an_empty_name(tmp_path):
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "", "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "--weights '': an empty name")


def test_an_input_refused_for_its_sidecar_counts_as_failed_not_skipped(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    args = ("walk", lr, "--scale", 2, "--seed", 1, "--seed", 2, "--weights", checkpoint, "--animate", "gif",
            "-o", tmp_path / "w")
    assert run(*args, "--steps", 3).exit_code == 0
    result = run(*args, "--steps", 4, "--skip-existing")  # other frames: the kept animation tells of another walk
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "0 written, 0 skipped, 1 failed"


@pytest.mark.parametrize("image, fragment", [
    (lambda lr: (lr * 255).astype(np.uint8), "not uint8"), (lambda lr: lr > 0.5, "not bool"),
    (lambda lr: lr - 2, "give floats in [0, 1]"), (lambda lr: lr * 1000, "give floats in [0, 1]"),
    (lambda lr: lr.astype(object), "not object")])
def test_the_python_api_takes_floats_in_0_1_only(image, fragment):
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    for call in (lambda a: up.upscale(a, [None]), lambda a: up.reference_z(a)):
        with pytest.raises(RefsrError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            call(image(lr))


def test_the_python_api_takes_what_numpy_gives_and_refuses_what_it_cannot_use(checkpoint):
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3))
    same = up.upscale(lr.astype(np.float32), [None])[0]
    assert np.array_equal(up.upscale(lr.astype(">f4"), [None])[0], same)  # big-endian, float64: the same image
    assert np.array_equal(up.upscale(lr, [None])[0], same)
    bank = up.reference_bank(np.random.default_rng(1).random((48, 48, 3)).astype(np.float32))
    numpy_seed = up.upscale(lr, [Texture(bank, seed=np.int64(3), temperature=1)])[0]
    assert np.array_equal(numpy_seed, up.upscale(lr, [Texture(bank, seed=3, temperature=1)])[0])
    for bad, fragment in [(lambda: Texture(None), "give a bank"), (lambda: up.upscale(lr, [3]), "not int"),
                          (lambda: up.upscale(lr, "abc"), "give a list"),
                          (lambda: up.upscale(lr, (x for x in [None])), "give a list"),
                          (lambda: up.upscale(lr, [None], alpha=np.zeros((3, 3))), "alpha"),
                          (lambda: up.upscale(lr, [None], alpha=np.full((16, 16), np.nan)), "alpha"),
                          (lambda: Upscaler.from_weights(checkpoint, scale=2, options="cpu"), "EngineOptions"),
                          (lambda: save_model("x", "never.safetensors"), "give a RefVAE")]:
        with pytest.raises(RefsrError, match=fragment):
            bad()
    assert not Path("never.safetensors").exists()


def test_save_model_writes_only_what_load_weights_reads(tmp_path):
    import os
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="the model's own"):
        save_model(tiny_model(2), tmp_path / "c.safetensors", config="{}")
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(RefsrError, match="not a regular file"):
        save_model(tiny_model(2), tmp_path / "fifo.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.safetensors"]


# --- the tenth sweep -----------------------------------------------------------------------------------------------

def test_prior_z_and_reference_z_take_numpy_seeds():
    up = Upscaler(tiny_model(2), "cpu")
    ref = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    assert torch.equal(up.prior_z(np.int64(3), 1.0).z, up.prior_z(3, 1.0).z)
    assert torch.equal(up.reference_z(ref, 1.0, np.uint8(3)).z, up.reference_z(ref, 1.0, 3).z)


def test_upscale_refuses_latents_and_arguments_it_cannot_use():
    from refsr_cli.engine import Latent
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    z = up.prior_z(0, 1.0).z
    assert np.array_equal(up.upscale(lr, [Latent(z.double(), 0)])[0], up.upscale(lr, [Latent(z, 0)])[0])
    for bad, fragment in [(Latent(torch.full_like(z, float("nan"))), "not finite"),  # was a black image
                          (Latent("x"), "float tensor"), (Latent(torch.zeros(1, 3)), r"\(1, 8\)"),
                          (Latent(z, 2 ** 70), "noise_seed"), (Latent(z, -1), "noise_seed"),
                          (Latent(z, 3.5), "noise_seed"), (Latent(z, 0, 1, 2.0), "noise_t")]:
        with pytest.raises(RefsrError, match=fragment):
            up.upscale(lr, [bad])
    for kwargs, fragment in [({"on_tile": 5}, "on_tile"), ({"transfer": "x"}, "transfer"), ({"bits": 12}, "bits"),
                             ({"bits": "x"}, "bits")]:
        with pytest.raises(RefsrError, match=fragment):
            up.upscale(lr, [None], **kwargs)


# --- the eleventh sweep --------------------------------------------------------------------------------------------

def test_a_hub_file_in_a_folder_named_snapshots_is_pinned_to_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from refsr_cli.checkpoint import recorded_weights
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "models--me--repo" / "snapshots" / ("c" * 40) / "snapshots" / "w.safetensors"
    assert recorded_weights("me/repo:snapshots/w.safetensors", cached) == f"me/repo@{'c' * 40}:snapshots/w.safetensors"
    assert recorded_weights("me/repo", cached.parent.parent / "refsr-x2.safetensors") == (
        f"me/repo@{'c' * 40}:refsr-x2.safetensors")
    assert recorded_weights(None, cached) == "shipped"


def test_a_z_too_large_for_the_network_is_refused_not_a_black_image(tmp_path):
    from refsr_cli.engine import Latent
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    z = up.prior_z(1, 1.0).z
    for huge in (torch.full_like(z, 1e300, dtype=torch.float64), z * 1e20, torch.full_like(z, 3e38)):
        with pytest.raises(RefsrError, match="not finite or past"):
            up.upscale(lr, [Latent(huge)])
    with pytest.raises(RefsrError, match="give a file name"):
        save_model(tiny_model(2), 5)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_array_is_taken_without_a_warning():
    # torch.from_numpy warns ("not writable") of a read-only array, such as np.asarray gives of a PIL image.
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    frozen = lr.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(up.upscale(frozen, [None])[0], up.upscale(lr, [None])[0])
        up.reference_z(frozen)


def test_a_long_thin_reference_is_refused_saying_it_was_shrunk():
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    thin = np.random.default_rng(0).random((40, 2000, 3)).astype(np.float32)
    with pytest.raises(RefsrError, match=r"2000x40 is too small .*long side brought to 512, its short one is 8"):
        up.reference_bank(thin)


def test_a_texture_bank_of_another_scale_is_refused():
    # Its patches carry that scale's grain; pasted at another scale they would silently give the wrong texture.
    from refsr_cli.errors import RefsrError
    x2, x4 = Upscaler(tiny_model(2), "cpu"), Upscaler(tiny_model(4), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    bank = x2.reference_bank(np.random.default_rng(1).random((64, 64, 3)).astype(np.float32), "r.png")
    x2.upscale(lr, [Texture(bank)])
    own = Texture(x4.reference_bank(np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)))
    for texture in (Texture(bank), Texture(own.bank, to=Texture(bank), t=0.5)):
        with pytest.raises(RefsrError, match="r.png's scale is 2, and this Upscaler's is 4"):
            x4.upscale(lr, [texture])


def test_an_upscaler_built_directly_refuses_what_it_cannot_run():
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="model: give a RefVAE"):
        Upscaler("weights/refsr-x2.safetensors", "cpu")
    for device in ("gpu", 3.5, None):
        with pytest.raises(RefsrError, match="not a torch device"):
            Upscaler(tiny_model(2), device)
    # What this torch cannot run on (torch raised an AssertionError for CUDA, a RuntimeError for MPS).
    for device, fragment in [("cuda:99", "no such CUDA device"), ("meta", "runs on 'cpu', 'cuda' or 'mps'")] + (
            [] if torch.backends.mps.is_available() else [("mps", "MPS is not available")]):
        with pytest.raises(RefsrError, match=fragment):
            Upscaler(tiny_model(2), device)


def test_a_walk_stops_on_an_end_it_cannot_use_in_one_line_and_leaves_no_folder(tmp_path, checkpoint):
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    good, thin = write_png(tmp_path / "good.png", 48, 48, seed=1), write_png(tmp_path / "thin.png", 40, 2000, seed=2)
    result = walk(lr, checkpoint, out, "--ref", thin, "--ref", good)
    assert result.exit_code == 2
    one_error_line(result, "thin.png: 2000x40 is too small", "long side brought to 512")  # not also "has 1"
    # Two names of one image: every frame would be the same.
    copy = tmp_path / "copy.png"
    copy.write_bytes(good.read_bytes())
    result = walk(lr, checkpoint, out, "--ref", good, "--ref", copy)
    assert result.exit_code == 2
    one_error_line(result, "good.png and --ref", "copy.png are the same image")
    assert not out.exists()  # a refused run made no output folder either


def test_running_out_of_memory_is_one_line_naming_what_to_lower():
    from refsr_cli.batch import failure_line
    line = failure_line(Path("huge.png"), MemoryError("Unable to allocate 25.7 GiB for an array with shape (96000, "
                                                      "96000, 3) and data type uint8"))
    assert line == ("huge.png: out of memory (Unable to allocate 25.7 GiB); lower --max-pixels, or upscale at a "
                    "smaller --scale")


@pytest.mark.parametrize("flags", [("--match",), ("--sheet",)])
def test_a_jpeg_record_too_large_for_its_references_is_refused_before_the_work(tmp_path, checkpoint, monkeypatch,
                                                                               flags):
    import refsr_cli.images
    lr = write_png(tmp_path / "in.png", 16, 16)
    refs = tmp_path / ("r" * 200)
    refs.mkdir()
    for i in range(4):
        write_png(refs / f"{'n' * 200}{i}.png", 48, 48, seed=i)
    # The run's record alone fits; with its four long reference names it does not.
    monkeypatch.setattr(refsr_cli.images, "JPEG_MAX_EXIF", 2500)
    decoded = []
    monkeypatch.setattr(Upscaler, "upscale", lambda self, *a, **k: decoded.append(1) or [])
    result = run("upscale", lr, "--ref", refs, *flags, "--format", "jpg", "--scale", 2, "--weights", checkpoint,
                 "-o", tmp_path / "out")
    assert result.exit_code == 1 and "more than a JPEG's EXIF holds (2500)" in result.stderr, result.stderr
    assert decoded == [] and "matching" not in result.stderr


def test_a_texture_is_checked_again_when_used_and_a_hand_made_bank_must_be_finite():
    import dataclasses
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    bank = up.reference_bank(np.random.default_rng(1).random((48, 48, 3)).astype(np.float32))
    for bad in (dataclasses.replace(bank, residual=torch.full_like(bank.residual, float("nan"))),
                dataclasses.replace(bank, step=float("nan"))):
        with pytest.raises(RefsrError, match="not finite numbers"):
            up.upscale(lr, [Texture(bad)])
    texture = Texture(bank)
    texture.strength = float("nan")  # set after it was made: a black image before
    with pytest.raises(RefsrError, match="strength"):
        up.upscale(lr, [texture])
    texture = Texture(bank)
    texture.bank = "x"
    with pytest.raises(RefsrError, match="give a bank"):
        up.upscale(lr, [texture])


def test_a_masked_array_is_checked_on_the_data_the_network_gets():
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    bad = lr.copy()
    bad[3, 3, 0] = np.nan  # masked, it hid from the checks and gave a black image
    for call in (lambda: up.upscale(np.ma.masked_invalid(bad), [None]),
                 lambda: up.upscale(lr, [None], alpha=np.ma.masked_invalid(bad[..., 0]))):
        with pytest.raises(RefsrError, match="not finite"):
            call()
    big = lr.copy()
    big[0, 0] = 255.0
    with pytest.raises(RefsrError, match=r"give floats in \[0, 1\]"):
        up.upscale(np.ma.masked_greater(big, 1), [None])


# --- the thirteenth sweep: the Python API's gaps of sweep 12b ---------------------------------------------------

def test_save_model_writes_where_load_weights_reads(tmp_path, monkeypatch):
    """A trailing slash names a folder (Path() drops it: a file "newdir" was written); ~ is the home folder, as
    load_weights reads it (a folder named "~" was made)."""
    from refsr_cli.errors import RefsrError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in ("newdir/", f"{tmp_path}/newdir/"):
        with pytest.raises(RefsrError, match="names a folder"):
            save_model(tiny_model(2), folder)
    assert list(tmp_path.iterdir()) == []
    save_model(tiny_model(2), "~/w.safetensors")
    assert (tmp_path / "home" / "w.safetensors").is_file() and not (tmp_path / "~").exists()
    assert load_weights("~/w.safetensors", 2).model.config.scale == 2


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_the_python_api_refuses_what_the_flags_cannot_give(tmp_path):
    """Each a RefsrError naming the argument: "no" is a true string, a 300-character name one the system will not
    look up, a meta or nested z one without numbers or a shape, and faithful() took any array."""
    from refsr_cli.engine import Latent
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="half='no'"):
        Upscaler.from_weights(scale=2, options=EngineOptions(device="cpu", half="no"))
    with pytest.raises(RefsrError, match="File name too long"):
        Upscaler.from_weights(str(tmp_path / ("a" * 300)), scale=2)
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    with pytest.raises(RefsrError, match="grayscale='no'"):
        up.upscale(lr, [None], grayscale="no")
    z = up.prior_z(1, 1.0).z
    for odd in (torch.empty(z.shape, device="meta"), torch.nested.nested_tensor([z[0]]), z.to_sparse()):
        with pytest.raises(RefsrError, match="Latent: z"):
            up.upscale(lr, [Latent(odd)])
    with pytest.raises(RefsrError, match="lr: holds pixels that are not finite"):
        up.faithful(np.full((16, 16, 3), np.nan, np.float32))
    with pytest.raises(RefsrError, match="HxWx3"):
        up.faithful(lr[..., 0])


def test_running_out_of_memory_in_the_api_is_a_refsr_error_and_still_a_memory_error(monkeypatch):
    from refsr_cli.batch import failure_line
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")

    def no_memory(*args):
        raise MemoryError("Unable to allocate 25.7 GiB for an array with shape (96000, 96000, 3) and data type uint8")
    monkeypatch.setattr(up, "_upscale", no_memory)
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    with pytest.raises(RefsrError, match=r"lr: 16x16 at x2: out of memory \(Unable to allocate 25.7 GiB\)$") as e:
        up.upscale(lr, [None])
    assert isinstance(e.value, MemoryError)
    # The commands' line for it still names the file and what to lower.
    assert failure_line(Path("huge.png"), e.value) == ("huge.png: out of memory (Unable to allocate 25.7 GiB); "
                                                       "lower --max-pixels, or upscale at a smaller --scale")


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 339738624 bytes. Error code 12 (Cannot allocate memory)")


def test_torch_running_out_of_the_computers_memory_is_the_out_of_memory_line(tmp_path, checkpoint, monkeypatch):
    """Torch's CPU allocator raises a RuntimeError, not a MemoryError: it was "internal error, please report it"
    in upscale, sample, walk and eval; and in the Python API a raw RuntimeError."""
    from PIL import Image
    from conftest import smooth_image
    from refsr_cli.errors import OutOfMemory
    from refsr_cli.model import RefVAE

    def exhausted(self, x):
        raise RuntimeError(CPU_ALLOCATOR)
    monkeypatch.setattr(RefVAE, "encode_lr", exhausted)
    lr = write_png(tmp_path / "in.png", 16, 16)
    line = "in.png: out of memory (Unable to allocate 324.0 MiB); lower --max-pixels"
    for command in (["upscale", lr], ["sample", lr, "--n", 2], ["walk", lr, "--seed", 1, "--seed", 2, "--steps", 2]):
        result = run(*command, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
        assert result.exit_code == 1, result.output
        one_error_line(result, line)
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(smooth_image(48, 40)).save(hr / "a.png")
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--device", "cpu")
    assert result.exit_code == 2
    one_error_line(result, "a.png: out of memory (Unable to allocate 324.0 MiB); give smaller images")
    up = Upscaler(tiny_model(2), "cpu")
    with pytest.raises(OutOfMemory, match=r"lr: 16x16 at x2: out of memory \(Unable to allocate 324.0 MiB\)"):
        up.faithful(np.zeros((16, 16, 3), np.float32))


def test_a_reference_memory_cannot_hold_is_named_in_one_line(tmp_path, checkpoint, monkeypatch):
    """Decoding it (Pillow's MemoryError was "cannot decode image (MemoryError: )"), its float copy (numpy's was
    "internal error", exit 1), or its texture bank (torch's): the reference's one line, exit 2."""
    from PIL import Image
    from refsr_cli import images
    from refsr_cli.model import RefVAE
    lr, ref = write_png(tmp_path / "in.png", 16, 16), write_png(tmp_path / "ref.png", 40, 40, seed=1)
    real_convert, real_transpose = Image.Image.convert, images.exif_transpose

    def convert(self, *args, **kwargs):
        if self.size == (40, 40):
            raise MemoryError()
        return real_convert(self, *args, **kwargs)

    def transpose(data, orientation):
        if data.shape[0] == 40:
            raise MemoryError("Unable to allocate 4.47 GiB for an array with shape (20000, 20000, 3) and data type "
                              "float32")
        return real_transpose(data, orientation)

    def exhausted(self, x):
        raise RuntimeError(CPU_ALLOCATOR)
    for target, name, fake, what in ((Image.Image, "convert", convert, ""),
                                     (images, "exif_transpose", transpose, " (Unable to allocate 4.47 GiB)"),
                                     (RefVAE, "encode_lr", exhausted, " (Unable to allocate 324.0 MiB)")):
        with monkeypatch.context() as patched:
            patched.setattr(target, name, fake)
            result = run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
        one_error_line(result, "reference", "ref.png: out of memory" + what)
    assert not (tmp_path / "out").exists()


def test_an_upscaler_built_directly_refuses_half_precision_on_the_cpu():
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="half=True needs a GPU"):
        Upscaler(tiny_model(2), "cpu", half=True)


# --- sweep 13b ------------------------------------------------------------------------------------------------------

def gpu_out_of_memory_above(pixels):
    """RefVAE.encode_lr as a GPU with room for `pixels` LR pixels a tile would run it."""
    from refsr_cli.model import RefVAE
    original = RefVAE.encode_lr

    def encode_lr(self, x):
        if x.shape[-1] * x.shape[-2] > pixels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)
    return encode_lr


def test_a_walk_animates_its_frames_when_a_retry_halved_the_tiles(tmp_path, checkpoint, monkeypatch):
    """Its frames record the tile each was made with; the check that the animation is made of this walk's frames
    took them for another run's. And the next input, which never ran out, too."""
    from refsr_cli.model import RefVAE
    monkeypatch.setattr(RefVAE, "encode_lr", gpu_out_of_memory_above(600))
    big, small = write_png(tmp_path / "a.png", 40, 40), write_png(tmp_path / "b.png", 16, 16)
    out = tmp_path / "out"
    result = run("walk", big, small, "--seed", 1, "--seed", 2, "--steps", 3, "--animate", "gif", "--scale", 2,
                 "--weights", checkpoint, "--tile", 32, "--tile-pad", 0, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert (out / "a_x2_walk.gif").is_file() and (out / "b_x2_walk.gif").is_file()


def test_a_reference_bank_is_made_again_with_smaller_tiles_when_the_gpu_runs_out(tmp_path, checkpoint, monkeypatch):
    from refsr_cli.model import RefVAE
    monkeypatch.setattr(RefVAE, "encode_lr", gpu_out_of_memory_above(600))
    lr, ref = write_png(tmp_path / "in.png", 16, 16), write_png(tmp_path / "ref.png", 64, 64, seed=3)
    result = run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", checkpoint, "--tile", 32, "--tile-pad", 0,
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "retrying with --tile 16" in result.stderr
    up = Upscaler(tiny_model(2), "cpu", tile=32, tile_pad=0)
    assert up.faithful(np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)).shape == (1, 3, 80, 80)
    assert up.tile == 16


def test_memory_running_out_for_a_reference_or_file_names_it(tmp_path, checkpoint, monkeypatch):
    """info (a foreign PNG Pillow decodes to reach its text), a reference of the learned texture (its z), eval
    --ref, train's images, and --match's references (the input was blamed, and --max-pixels)."""
    from PIL import Image
    from refsr_cli import batch, train_data
    lr, ref = write_png(tmp_path / "in.png", 16, 16), write_png(tmp_path / "ref.png", 40, 40, seed=3)
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", 48, 40)
    real_convert = Image.Image.convert

    def no_room_for_40(self, *args, **kwargs):
        if self.size == (40, 40):
            raise MemoryError("Unable to allocate 4.47 GiB for an array with shape (20000, 20000, 3)")
        return real_convert(self, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "convert", no_room_for_40)
        patched.setattr(Image.Image, "resize", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
        result = run("upscale", lr, "--ref", ref, "--texture", "learned", "--scale", 2, "--weights", checkpoint,
                     "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
        one_error_line(result, "reference", "ref.png: out of memory")
        result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--ref", ref, "--device", "cpu")
        assert result.exit_code == 2, result.output
        one_error_line(result, "reference", "ref.png: out of memory", "give smaller references")
    with monkeypatch.context() as patched:
        patched.setattr(train_data, "read_rgb", lambda p: (_ for _ in ()).throw(MemoryError("Unable to allocate "
                                                                                             "7.5 GiB for x")))
        result = run(*train_args(tmp_path, "--init", checkpoint))
        assert result.exit_code == 2, result.output
        one_error_line(result, "out of memory (Unable to allocate 7.5 GiB)", "training holds its images in memory")
        assert "--batch" not in result.stderr
    with monkeypatch.context() as patched:
        patched.setattr(batch, "correspond", lambda *a: (_ for _ in ()).throw(RuntimeError(CPU_ALLOCATOR)))
        result = run("upscale", lr, "--ref", ref, "--match", "--scale", 2, "--weights", checkpoint, "-o",
                     tmp_path / "m", "-q")
        assert result.exit_code == 1, result.output
        one_error_line(result, "in.png: out of memory (Unable to allocate 324.0 MiB) matching its 1 reference(s)",
                       "fewer or smaller references")
    foreign = tmp_path / "foreign.png"
    Image.new("RGB", (8, 8)).save(foreign)
    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(MemoryError()))
        result = run("info", foreign, foreign)
    assert result.exit_code == 1
    assert result.stderr.count("foreign.png: out of memory") == 2, result.stderr  # each named; the next still read


def test_matching_through_the_python_api_refuses_what_would_give_a_black_image():
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr = rng.random((20, 20, 3)).astype(np.float32)
    lr_t = torch.from_numpy(lr).permute(2, 0, 1)[None]
    ref = prepare_reference(rng.random((48, 48, 3)).astype(np.float32), 2)
    for bad, fragment in (((lr_t * float("nan"), [ref], 2), "lr: holds pixels"),
                          ((lr_t, [ref.float() * float("nan")], 2), r"references\[0\]: holds pixels"),
                          ((lr, [ref], 2), "lr: give a"), ((lr_t, [ref], 0), "scale=0"),
                          ((lr_t, ref, 2), "references: give a list"), ((lr_t, [np.zeros(3)], 2), r"references\[0\]")):
        with pytest.raises(RefsrError, match=fragment):
            correspond(*bad)
    with pytest.raises(RefsrError, match="seed"):
        correspond(lr_t, [ref], 2, seed=2 ** 64)
    with pytest.raises(RefsrError, match="not finite"):
        prepare_reference(np.full((48, 48, 3), np.nan, np.float32), 2)
    with pytest.raises(RefsrError, match="HxWx3"):
        prepare_reference([[1]], 2)
    for other, fragment in ((correspond(lr_t, [ref], 4), "made at x4"),
                            (correspond(lr_t[..., :10, :10], [ref], 2), "not one correspond.. made for this 20x20 lr")):
        with pytest.raises(RefsrError, match=f"transfer: .*{fragment}"):
            up.upscale(lr, [None], transfer=other)


def test_a_hand_made_bank_past_any_pixel_value_is_refused():
    import copy
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr = rng.random((16, 16, 3)).astype(np.float32)
    bank = up.reference_bank(rng.random((48, 48, 3)).astype(np.float32))
    for field, value, fragment in (("residual", bank.residual.double() * 1e300, "residual or step"),
                                   ("step", 1e300, "residual or step"), ("step", True, "residual or step"),
                                   ("residual", bank.residual.double() * 1e39, "residual or step"),  # inf in float32
                                   ("residual", torch.empty(bank.residual.shape, device="meta"), "not a bank"),
                                   ("residual", bank.residual[:, :100], "outside its residual"),
                                   ("starts", bank.starts.float(), "not a bank"),
                                   ("starts", bank.starts - 10 ** 6, "outside its residual"),
                                   ("keys", bank.keys[:, :5], "not a bank"), ("keys", bank.keys[:0], "not a bank"),
                                   ("residual", bank.residual[:2], "not a bank"),
                                   ("residual", bank.residual.to(torch.complex64), "not a bank")):
        odd = copy.copy(bank)
        setattr(odd, field, value)
        with pytest.raises(RefsrError, match=fragment):
            up.upscale(lr, [Texture(odd, 1, 1.0)])
    assert up.upscale(lr, [Texture(bank, 1, 1.0)])[0].std() > 0  # the bank as made still works


def test_weights_and_checkpoint_names_the_system_refuses_are_one_line(tmp_path, checkpoint):
    from refsr_cli.errors import RefsrError
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "~nosuchuser/x.safetensors",
                 "-o", tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "~nosuchuser is no home folder here")
    for call in (lambda: load_weights("~nosuchuser/x.safetensors", 2),
                 lambda: save_model(tiny_model(2), "~nosuchuser/x.safetensors")):
        with pytest.raises(RefsrError, match="no home folder"):
            call()
    for name, fragment in (("x" * 300 + ".safetensors", "File name too long"), ("a\x00b.safetensors", "null"),
                           ("dir/.", "names a folder"), ("dir/..", "names a folder")):
        with pytest.raises(RefsrError, match=fragment):
            save_model(tiny_model(2), f"{tmp_path}/{name}")  # (a Path would drop the /.)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "tiny-x2.safetensors"]


def test_a_sheet_label_too_long_is_cut_in_its_middle_where_two_names_still_differ():
    from PIL import Image, ImageDraw, ImageFont
    from refsr_cli.sheet import fitted
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    a, b = (fitted(draw, font, f"--ref holiday_photos_2024_summer_beach_sunset_view_00{i}.png", 128) for i in (1, 2))
    assert a != b and a.startswith("--ref ho") and a.endswith("1.png") and "…" in a
    assert draw.textlength(a, font=font) <= 126
    assert fitted(draw, font, "--seed 3", 128) == "--seed 3"


def test_the_python_apis_numbers_are_taken_as_the_flags_take_them():
    """A Fraction temperature raised a raw TypeError in the tensor arithmetic; a tile set after the Upscaler was made
    returned an uninitialised buffer."""
    from fractions import Fraction
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    assert torch.equal(up.prior_z(1, Fraction(1, 2)).z, up.prior_z(1, 0.5).z)
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    assert torch.equal(up.reference_z(lr, Fraction(1, 2), 3).z, up.reference_z(lr, 0.5, 3).z)
    for field, value in (("tile", -5), ("tile", 8.5), ("tile_pad", -3), ("consistency_steps", float("nan"))):
        odd = Upscaler(tiny_model(2), "cpu")
        setattr(odd, field, value)
        with pytest.raises(RefsrError, match=field):
            odd.upscale(lr, [None])
        with pytest.raises(RefsrError, match=field):
            odd.faithful(lr)


# --- sweep 13c ------------------------------------------------------------------------------------------------------

def test_memory_running_out_while_weights_load_names_the_file(tmp_path, checkpoint, monkeypatch):
    """safetensors maps the file; under a memory limit torch's "unable to mmap ... Cannot allocate memory (12)" was
    'internal error', exit 1. And an ENOMEM OSError was taken for trouble with a file's name."""
    from PIL import Image
    from refsr_cli import checkpoint as checkpoints
    from refsr_cli.errors import memory_trouble

    def no_room(path):
        raise RuntimeError(f"unable to mmap 11087128 bytes from file <{path}>: Cannot allocate memory (12)")
    monkeypatch.setattr(checkpoints, "read_weights", no_room)
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", checkpoint, "-o",
                 tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result, "tiny-x2.safetensors: out of memory (Unable to allocate 10.6 MiB)")
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.new("RGB", (48, 40)).save(hr / "a.png")
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints, "load_file", no_room)  # the weights', then the backbones' (LPIPS, VGG16)
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--device", "cpu")
    assert result.exit_code == 2
    one_error_line(result, ".safetensors: out of memory")
    assert memory_trouble(OSError(12, "Cannot allocate memory", "k")) == "out of memory"


def test_a_file_in_the_way_of_the_output_folder_is_named(tmp_path, checkpoint):
    lr = write_png(tmp_path / "in.png")
    (tmp_path / "afile").touch()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, fragment in ((tmp_path / "afile" / "x.png", "afile is a file, not a folder"),
                          (tmp_path / "dangling", "dangling is a link to nothing")):
        result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out)
        assert result.exit_code == 2
        one_error_line(result, "cannot create the output folder", fragment)


# --- sweep 14b ------------------------------------------------------------------------------------------------------

def test_a_transfer_changed_after_it_was_made_is_refused_not_a_black_image():
    import copy
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import Transfer, correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr = rng.random((16, 16, 3)).astype(np.float32)
    made = correspond(torch.from_numpy(lr).permute(2, 0, 1)[None], [prepare_reference(
        rng.random((48, 48, 3)).astype(np.float32), 2)], 2)
    for field in ("gain", "offset", "confidence", "positions"):
        odd = copy.deepcopy(made)
        getattr(odd.matches[0], field).fill_(float("nan"))
        with pytest.raises(RefsrError, match="transfer: match 0"):
            up.upscale(lr, [None], transfer=odd)
    odd = copy.deepcopy(made)
    odd.matches[0].reference = odd.matches[0].reference.float() * float("nan")
    with pytest.raises(RefsrError, match="match 0's reference"):
        up.upscale(lr, [None], transfer=odd)
    for odd in (Transfer([], 2), Transfer(["x"], 2)):
        with pytest.raises(RefsrError, match="transfer"):
            up.upscale(lr, [None], transfer=odd)
    assert up.upscale(lr, [None], transfer=made)[0].std() > 0


def test_the_upscalers_own_numbers_are_taken_as_python_ints():
    """bits as a tensor passed `in (8, 16)` and gave 8-bit output where 16 was asked for; numpy's small or unsigned
    tile_pad wrapped around in the tiles' arithmetic; a scale or precision set after it was made raised deep
    inside."""
    from refsr_cli.errors import RefsrError
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    up = Upscaler(tiny_model(2), "cpu")
    for bits in (torch.tensor(16), np.array(16), 16.0):
        with pytest.raises(RefsrError, match="bits="):
            up.upscale(lr, [None], bits=bits)
    assert up.upscale(lr, [None], bits=np.int64(16))[0].dtype == np.uint16
    small = Upscaler(tiny_model(2), "cpu", tile=np.int8(16), tile_pad=np.uint8(4))
    assert np.array_equal(small.upscale(lr, [None])[0], Upscaler(tiny_model(2), "cpu", tile=16, tile_pad=4).upscale(
        lr, [None])[0])
    for field, value in (("scale", 4), ("dtype", torch.float64)):
        odd = Upscaler(tiny_model(2), "cpu")
        setattr(odd, field, value)
        with pytest.raises(RefsrError, match="is not as made"):
            odd.upscale(lr, [None])


def test_the_shipped_weights_are_never_written_and_paths_are_taken_as_paths(tmp_path, monkeypatch):
    """On a copy of the weights folder, which refsr takes for its own: code that did write there (as this test's
    failing run did, before the fix) must not be able to touch the checkout's."""
    import os
    import shutil
    from refsr_cli import checkpoint, train
    from refsr_cli.errors import RefsrError
    own = tmp_path / "weights"
    own.mkdir()
    for real in checkpoint.weights_dir().iterdir():  # the backbones linked, the weights to write at copied
        (own / real.name).symlink_to(real)
    shipped = own / "refsr-x2.safetensors"
    shipped.unlink()
    shutil.copy(checkpoint.weights_dir() / shipped.name, shipped)
    monkeypatch.setattr(checkpoint, "weights_dir", lambda: own)
    monkeypatch.setattr(train, "weights_dir", lambda: own, raising=False)
    weights_dir = checkpoint.weights_dir
    before = shipped.read_bytes()
    loaded = load_weights(shipped, 2)
    with pytest.raises(RefsrError, match="refsr's own weights folder"):
        save_model(loaded.model, loaded.path)
    assert shipped.read_bytes() == before

    class Named:
        def __fspath__(self):
            return str(shipped)
    assert load_weights(Named(), 2).sha256 == loaded.sha256
    assert load_weights(os.fsencode(shipped), 2).sha256 == loaded.sha256
    result = run(*train_args(tmp_path, "--out", weights_dir()))
    assert result.exit_code == 2
    one_error_line(result, "refsr's own weights folder")
    assert shipped.read_bytes() == before


def test_a_cache_copy_that_is_not_a_file_is_refused_not_read(tmp_path, monkeypatch):
    """A FIFO or a link to /dev/zero where the Hub cache's file was: reading it would hang."""
    import os
    from refsr_cli import hub
    from refsr_cli.checkpoint import resolve_weights
    from refsr_cli.errors import RefsrError
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(hub, "download_from_hub", lambda repo, filename, revision: fifo)
    with pytest.raises(RefsrError, match="not a regular file; remove it"):
        resolve_weights("owner/repo:w.safetensors", 2)


# --- sweep 14a ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["plan", "reference", "info", "eval"])
def test_an_interruption_c_code_turned_into_an_error_is_still_the_signals(tmp_path, checkpoint, monkeypatch, where):
    """SIGTERM while safetensors read the texture bank came back as its error: "texture bank ...: damaged", exit 2,
    for a shipped file that is whole. The signal's line and exit code win over any error that follows it."""
    import signal
    from refsr_cli import engine, evaluate, provenance, report
    from refsr_cli.errors import RefsrError

    def interrupted(*args, **kwargs):
        report.SIGNALLED.append(signal.SIGTERM)  # as the handler notes it; C code then raises its own error
        raise RefsrError("texture bank weights/texture-bank-x2.safetensors: damaged (could not determine the shape)")

    def unreadable(path):
        report.SIGNALLED.append(signal.SIGTERM)
        raise ValueError("broken PNG")  # Pillow's, as info reports a foreign file
    lr = write_png(tmp_path / "in.png", 16, 16)
    if where == "plan":
        monkeypatch.setattr(engine, "load_bank", interrupted)
        result = run("sample", lr, "--n", 2, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    elif where == "reference":
        monkeypatch.setattr(engine.Upscaler, "reference_bank", interrupted)
        refs = [write_png(tmp_path / f"r{i}.png", 40, 40, seed=i) for i in range(2)]
        result = run("upscale", lr, "--ref", refs[0], "--ref", refs[1], "--scale", 2, "--weights", checkpoint, "-o",
                     tmp_path / "out", "-q")
    elif where == "info":
        monkeypatch.setattr(provenance, "read_provenance", unreadable)
        result = run("info", lr, lr)
    else:
        monkeypatch.setattr(evaluate, "read_rgb", interrupted)  # the reference's
        hr = tmp_path / "hr"
        hr.mkdir()
        write_png(hr / "a.png", 48, 40)
        result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--ref", lr, "--device", "cpu")
    assert result.exit_code == 143, result.output
    one_error_line(result, "terminated")


# --- sweep 15b ------------------------------------------------------------------------------------------------------

def test_numbers_past_any_float_are_refused_by_name():
    """math.isfinite(10**400) raised OverflowError before the range was checked."""
    from fractions import Fraction
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    bank = up.reference_bank(np.random.default_rng(0).random((48, 48, 3)).astype(np.float32))
    for call, name in ((lambda: up.prior_z(10 ** 400), "seed"), (lambda: up.prior_z(1, Fraction(10 ** 400, 3)),
                                                                  "temperature"),
                       (lambda: Upscaler(tiny_model(2), "cpu", tile=10 ** 400), "tile"),
                       (lambda: load_weights(None, 10 ** 400), "scale")):
        with pytest.raises(RefsrError, match=name):
            call()
    import copy
    odd = copy.copy(bank)
    odd.step = 10 ** 400
    with pytest.raises(RefsrError, match="residual or step"):
        up.upscale(np.zeros((16, 16, 3), np.float32), [Texture(odd, 1, 1.0)])


def test_a_hand_made_bank_or_transfer_past_its_ranges_is_refused():
    """int64 starts or widths near 2^63 wrapped around past the bank's bounds check (IndexError); a finite position
    of 3e38 in a Transfer blended a black image."""
    import copy
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr = rng.random((16, 16, 3)).astype(np.float32)
    bank = up.reference_bank(rng.random((48, 48, 3)).astype(np.float32))
    for field, value in (("widths", torch.full_like(bank.widths, 1229782938247303442)),
                         ("starts", torch.full_like(bank.starts, 2 ** 63 - 10))):
        odd = copy.copy(bank)
        setattr(odd, field, value)
        with pytest.raises(RefsrError, match="outside its residual"):
            up.upscale(lr, [Texture(odd, 1, 1.0)])
    made = correspond(torch.from_numpy(lr).permute(2, 0, 1)[None], [prepare_reference(
        rng.random((48, 48, 3)).astype(np.float32), 2)], 2)
    for field, value in (("positions", 3e38), ("positions", 1e300), ("gain", 3e38), ("confidence", 2.0)):
        odd = copy.deepcopy(made)
        tensor = getattr(odd.matches[0], field)
        setattr(odd.matches[0], field, torch.full_like(tensor, value, dtype=torch.float64))
        with pytest.raises(RefsrError, match="in their ranges"):
            up.upscale(lr, [None], transfer=odd)


def test_an_upscaler_whose_model_or_device_was_changed_is_refused():
    """A model moved to the meta device returned an uninitialised image; others raised deep inside."""
    from refsr_cli.errors import RefsrError
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    for change in (lambda u: u.model.to("meta"), lambda u: u.model.double(), lambda u: setattr(u, "dtype", torch.float16),
                   lambda u: setattr(u, "device", torch.device("meta")), lambda u: setattr(u, "device", "banana"),
                   lambda u: setattr(u, "warn", None)):
        odd = Upscaler(tiny_model(2), "cpu")
        change(odd)
        with pytest.raises(RefsrError, match="is not as made"):
            odd.upscale(lr, [None])


def test_an_image_memory_cannot_check_is_out_of_memory_naming_it(monkeypatch):
    from refsr_cli.errors import OutOfMemory
    up = Upscaler(tiny_model(2), "cpu")
    real = np.isfinite

    def no_room(values, *args, **kwargs):
        if getattr(values, "shape", ())[:2] == (40, 40):
            raise MemoryError("Unable to allocate 17.9 GiB for an array with shape (40000, 40000, 3)")
        return real(values, *args, **kwargs)
    monkeypatch.setattr(np, "isfinite", no_room)
    with pytest.raises(OutOfMemory, match=r"lr: 40x40: out of memory \(Unable to allocate 17.9 GiB\)"):
        up.upscale(np.zeros((40, 40, 3), np.float32), [None])


def test_the_hub_cache_under_a_user_without_a_home_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from refsr_cli.errors import RefsrError
    from refsr_cli.hub import download_from_hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "~nosuchuser/cache")
    with pytest.raises(RefsrError, match="cannot use the Hugging Face cache .~nosuchuser/cache: ~nosuchuser is no home"):
        download_from_hub("owner/repo", "w.safetensors", None)


# --- sweep 15a ------------------------------------------------------------------------------------------------------

def test_torch_is_imported_with_signals_held(monkeypatch):
    """A Ctrl-C raised inside torch's C++ start-up aborted the process (exit 134): the signal waits for the import."""
    import builtins
    import signal
    from refsr_cli import cli, report
    held, real = [], builtins.__import__

    def watching(name, *args, **kwargs):
        if name == "torch":
            held.append(signal.getsignal(signal.SIGINT) is not report.on_sigint)
        return real(name, *args, **kwargs)
    signal.signal(signal.SIGINT, report.on_sigint)  # as Commands.main sets it
    try:
        monkeypatch.setattr(builtins, "__import__", watching)
        cli.torch_imported()
    finally:
        monkeypatch.setattr(builtins, "__import__", real)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert held == [True]


# --- sweep 16b ------------------------------------------------------------------------------------------------------

def test_an_upscalers_model_is_checked_whole_before_each_image():
    """Non-finite weights of a model handed in, or a later submodule moved to float64 or the meta device, gave a
    black image or a raw error; reference_z, prior_z and texture_bank did not check at all; cpu:0 was refused."""
    from refsr_cli.errors import RefsrError
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    nan = tiny_model(2)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    with pytest.raises(RefsrError, match="not all finite"):
        Upscaler(nan, "cpu")
    for change in (lambda m: m.trunk.tails.double(), lambda m: m.trunk.tails.to("meta")):
        up = Upscaler(tiny_model(2), "cpu")
        change(up.model)
        for call in (lambda: up.upscale(lr, [None]), lambda: up.reference_z(lr), lambda: up.prior_z(1),
                     lambda: up.texture_bank()):
            with pytest.raises(RefsrError, match="is not as made"):
                call()
    assert Upscaler(tiny_model(2), "cpu:0").upscale(lr, [None])[0].shape == (32, 32, 3)
    with pytest.raises(RefsrError, match="warn: give a function"):
        Upscaler(tiny_model(2), "cpu", warn="x")


def test_save_model_and_correspond_refuse_what_they_cannot_take(tmp_path):
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond

    class Bytes:
        def __fspath__(self):
            return os.fsencode(str(tmp_path / "b.safetensors"))

    class Number:
        def __fspath__(self):
            return 5
    import os
    save_model(tiny_model(2), Bytes())
    assert (tmp_path / "b.safetensors").is_file()
    for call, fragment in ((lambda: save_model(tiny_model(2), Number()), "gives no file name"),
                           (lambda: load_weights(Number(), 2), "gives no file name"),
                           (lambda: save_model(tiny_model(2), tmp_path / "s.safetensors", step=10 ** 5000),
                            "cannot be written as text"),
                           (lambda: save_model(tiny_model(2).to("meta"), tmp_path / "m.safetensors"), "meta"),
                           (lambda: correspond(torch.rand(1, 3, 20, 20), [torch.zeros(
                               (1, 3, 40, 10 ** 6), dtype=torch.uint8).expand(1, 3, 40, 10 ** 6)], 2),
                            "more than")):
        with pytest.raises(RefsrError, match=fragment):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]


def test_a_hub_file_name_that_names_no_file_is_refused():
    from refsr_cli.errors import RefsrError
    from refsr_cli.hub import download_from_hub
    for name in (".", "sub/..", "sub/"):
        with pytest.raises(RefsrError, match="is not a file name in the repository"):
            download_from_hub("owner/repo", name, None)


# --- sweep 16a ------------------------------------------------------------------------------------------------------

def test_a_token_file_push_cannot_read_is_one_line_before_any_request(tmp_path, monkeypatch, checkpoint):
    """A token file that is not text was 'internal error', exit 1; a library that cannot be loaded under a memory
    limit is out of memory, not a bug; a small allocation is said in MiB, not '0.00 GiB'."""
    from huggingface_hub import constants
    from refsr_cli.errors import memory_trouble
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token))
    result = run("push", checkpoint, "me/repo")
    assert result.exit_code == 2, result.output
    one_error_line(result, "cannot read the Hub token file", "HF_TOKEN_PATH")
    assert memory_trouble(ImportError("libtorch_cpu.so: failed to map segment from shared object")) == (
        "out of memory (loading a library)")
    assert memory_trouble(RuntimeError("can't allocate memory: you tried to allocate 4096 bytes")) == (
        "out of memory (Unable to allocate 4.0 KiB)")


# --- sweep 17b ------------------------------------------------------------------------------------------------------

def test_weights_that_overflow_are_refused_not_a_black_image(tmp_path):
    """Finite weights can still overflow float32 inside the network (3e38 in one layer): its nan output was cast to
    an all-black image, exit 0; a reference's z came out nan."""
    from refsr_cli.errors import RefsrError
    model = tiny_model(2)
    with torch.no_grad():
        model.trunk.head.weight.fill_(3e38)
        model.ref_to_posterior.weight.fill_(3e38)
    up = Upscaler(model, "cpu")  # finite: nothing to refuse before the work
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    for call in (lambda: up.upscale(lr, [None]), lambda: up.faithful(lr), lambda: up.reference_z(lr)):
        with pytest.raises(RefsrError, match="weights overflow in float32 arithmetic"):
            call()
    # Sweep 18b: an overflow to +-inf, not nan, was clamped to 0 or 1 by the back-projection (or the transfer's
    # blend) before the check saw it; one in the texture branch, or in a reference's logvar, alike.
    for layer, calls in (("trunk.tails.x2.3", (lambda u: u.upscale(lr, [None]), lambda u: u.faithful(lr))),
                         ("to_rgb", (lambda u: u.upscale(lr, [u.prior_z(3)]),)),
                         ("ref_to_posterior", (lambda u: u.reference_z(lr, 1.0),))):
        over = tiny_model(2)
        with torch.no_grad():
            weight = over.get_submodule(layer).weight
            (weight[len(weight) // 2:] if layer == "ref_to_posterior" else weight).fill_(3e38)  # (its logvar half)
        for steps in (0, 4):
            up = Upscaler(over, "cpu", consistency_steps=steps)
            for call in calls:
                with pytest.raises(RefsrError, match="weights overflow"):
                    call(up)
    save_model(model, tmp_path / "big.safetensors")
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", tmp_path / "big.safetensors",
                 "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "in.png: the network's weights overflow" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_upscalers_buffers_and_hand_set_tensors_are_checked_too():
    """named_parameters() leaves out buffers (the VGG's mean and std) and a weight deleted and set again as a plain
    tensor: float64 ones raised torch's own RuntimeError, nan ones gave a nan z or a black image."""
    from refsr_cli.errors import RefsrError
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)

    def reset_head(model, tensor):
        del model.trunk.head.weight
        model.trunk.head.weight = tensor

    for change, fragment in (
            # sweep 18b: an int or sparse weight, a submodule swapped for another
            (lambda m: reset_head(m, m.trunk.head.weight.detach().to(torch.int32)), "is not as made"),
            (lambda m: reset_head(m, m.trunk.head.weight.detach().to_sparse()), "is not as made"),
            (lambda m: setattr(m.trunk, "head", torch.nn.Identity()), "is not as made"),
            (lambda m: setattr(m.vgg, "mean", m.vgg.mean.double()), "is not as made"),
            (lambda m: m.vgg.mean.fill_(float("nan")), r"vgg\.mean holds nan"),
            (lambda m: reset_head(m, m.trunk.head.weight.detach().double()), "is not as made"),
            (lambda m: reset_head(m, m.trunk.head.weight.detach().clone().fill_(float("nan"))),
             r"trunk\.head\.weight holds nan")):
        up = Upscaler(tiny_model(2), "cpu")
        with torch.no_grad():
            change(up.model)
        for call in (lambda: up.upscale(lr, [None]), lambda: up.reference_z(lr)):
            with pytest.raises(RefsrError, match=fragment):
                call()


def test_the_python_api_refuses_odd_devices_tied_weights_and_banks_by_name(tmp_path):
    from refsr_cli.errors import RefsrError
    with pytest.raises(RefsrError, match="not a torch device"):
        Upscaler(tiny_model(2), 2 ** 70)  # torch's ValueError "Overflow when unpacking long long"
    tied = tiny_model(2)
    tied.cond_body[2].conv1.weight = tied.fuse_body[0].conv1.weight
    with pytest.raises(RefsrError, match=r"weights .*conv1\.weight and .*conv1\.weight share memory \(tied\)"):
        save_model(tied, tmp_path / "tied.safetensors")
    assert list(tmp_path.iterdir()) == []
    # A bank's step as numpy's float32 is a number like any other; a scale given as text is named as it is.
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    bank = up.reference_bank(np.random.default_rng(1).random((64, 64, 3)).astype(np.float32))
    expected = up.upscale(lr, [Texture(bank, seed=1)])[0]
    bank.step = np.float32(bank.step)
    assert np.array_equal(up.upscale(lr, [Texture(bank, seed=1)])[0], expected)
    bank.scale = "2"
    with pytest.raises(RefsrError, match="scale is '2', and this Upscaler's is 2"):
        up.upscale(lr, [Texture(bank, seed=1)])


def test_a_file_name_safetensors_cannot_open_is_said_so(tmp_path, checkpoint):
    """safetensors opens only UTF-8 names: a good checkpoint under a Latin-1 name was 'not a readable safetensors
    checkpoint', and save_model wrote files under such names that nothing could read back."""
    import os
    from refsr_cli.errors import RefsrError
    latin = Path(os.fsdecode(os.fsencode(tmp_path) + b"/w\xff.safetensors"))
    latin.write_bytes(checkpoint.read_bytes())
    names = sorted(p.name for p in tmp_path.iterdir())
    result = refsr_process("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", latin,
                           "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "safetensors can open only file names that are valid UTF-8" in (
        result.stderr), result.stderr
    with pytest.raises(RefsrError, match="valid UTF-8"):
        save_model(tiny_model(2), tmp_path / "s\udcff.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["in.png"])


def test_push_in_offline_mode_sends_nothing_and_says_so(checkpoint, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run("push", checkpoint, "me/repo")
    assert result.exit_code == 2, result.output  # 2: nothing was sent (1 is a push that failed on the way)
    one_error_line(result, "me/repo: offline mode (HF_HUB_OFFLINE=1) is on, and push needs the Hub")


def test_a_token_file_a_download_cannot_read_is_named(tmp_path, monkeypatch):
    """It was blamed on 'the HF_* environment variables and HF_TOKEN', where push names the file."""
    from huggingface_hub import constants
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    result = run("upscale", write_png(tmp_path / "in.png"), "--scale", 2, "--weights", "owner/repo:w.safetensors",
                 "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    one_error_line(result, "owner/repo:w.safetensors: cannot read the Hub token file", "HF_TOKEN_PATH")


# --- sweep 18a ------------------------------------------------------------------------------------------------------

def overflowing(tmp_path, layer="trunk.tails.x2.3"):
    """A tiny x2 checkpoint whose `layer` is filled with 3e38: finite weights that overflow float32 inside."""
    model = tiny_model(2)
    with torch.no_grad():
        model.get_submodule(layer).weight.fill_(3e38)
    save_model(model, tmp_path / "over.safetensors")
    return tmp_path / "over.safetensors"


def test_an_overflow_on_a_reference_names_the_reference(tmp_path):
    """It read 'reference the network's weights overflow...': the reference was not named."""
    weights, lr = overflowing(tmp_path), write_png(tmp_path / "in.png", 16, 16)
    ref = write_png(tmp_path / "r.png", 48, 48, seed=1)
    result = run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", weights, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    one_error_line(result, f"reference {ref}: the network's weights overflow")
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "h.png", 32, 32)
    result = run("eval", tmp_path / "hr", "--scale", 2, "--weights", weights, "--device", "cpu", "--ref", ref,
                 "--ref", write_png(tmp_path / "r2.png", 48, 48, seed=2))
    assert result.exit_code == 2, result.output
    one_error_line(result, f"reference {ref}: the network's weights overflow")


def test_a_run_that_diverges_at_its_first_step_blames_what_it_started_from(tmp_path):
    """Weights that overflow given to --init said 'the last checkpoint is kept: lower --learning-rate', with no
    checkpoint there."""
    from conftest import tiny_config
    from refsr_cli.errors import RefsrError, memory_trouble
    from refsr_cli.train import fit
    from test_train import trunk_options
    weights, out = overflowing(tmp_path), tmp_path / "run"
    with pytest.raises(RefsrError) as caught:
        fit(trunk_options((photos(tmp_path / "photos"), None), out, scales=(2,), steps=2, save_every=1,
                          init=[str(weights)], config=tiny_config(2)))
    assert str(caught.value).startswith("step 0: the loss is ")
    assert f"at the run's first step, before any checkpoint: the weights it starts from ({weights})" in str(
        caught.value) and "checkpoint is kept" not in str(caught.value)
    assert not [p for p in out.iterdir() if p.suffix == ".safetensors"]
    # and oneDNN's failure to make a convolution under a memory limit is the computer's memory, not a bug
    assert memory_trouble(RuntimeError("could not create a primitive")) == (
        "out of memory (oneDNN could not create a primitive)")



# --- sweep 19a ------------------------------------------------------------------------------------------------------

def test_info_refuses_a_record_of_one_image_on_an_animation(tmp_path, checkpoint):
    """Its redo writes the frames, or a sheet, not the animation: the format alone (webp, png) did not tell."""
    from PIL import Image, PngImagePlugin
    image_with_record(tmp_path, checkpoint, {})
    info = PngImagePlugin.PngInfo()
    info.add_text("refsr", Image.open(tmp_path / "bad.png").info["refsr"])
    frames = [Image.new("RGB", (4, 4), (v, v, v)) for v in (0, 255)]
    frames[0].save(tmp_path / "animated.png", save_all=True, append_images=frames[1:], pnginfo=info)
    result = run("info", tmp_path / "animated.png")
    assert result.exit_code == 1, result.output
    one_error_line(result, "animated.png", "describes one image, and this file is an animation")


def test_a_state_that_diverges_in_the_optimizer_says_which_checkpoint_is_kept(tmp_path, monkeypatch):
    """Non-finite optimizer moments at a save were refused by the file writer as weights 'that would give black
    images', naming a state that was not written; the advice to lower --learning-rate could not be followed by a
    --resume, which takes the run's options."""
    from refsr_cli import train
    from refsr_cli.errors import RefsrError
    from test_train import trunk_options
    real = train.set_learning_rate

    def poisoning(optimizers, opt, step):
        optimizers = list(optimizers)
        real(optimizers, opt, step)
        for state in (optimizers[0].state[p] for group in optimizers[0].param_groups for p in group["params"]):
            if step >= 1 and "exp_avg_sq" in state:
                state["exp_avg_sq"].fill_(float("inf"))

    monkeypatch.setattr(train, "set_learning_rate", poisoning)
    out = tmp_path / "run"
    with pytest.raises(RefsrError, match=r"^step 2: the training state is no longer finite numbers \(optimizer\..*"
                                         r"nothing was saved; the last checkpoint \(step 1\) is kept"):
        train.fit(trunk_options((photos(tmp_path / "photos"), None), out, scales=(2,), steps=4, save_every=1))
    assert read_metadata(out / "last.state.safetensors")["step"] == "1"
    assert "holds, which cannot be trained on: start again (--overwrite)" in train.diverged_line(
        trunk_options((None, None), out), train.Diverged(2, "step 2: the loss is nan"), 2)


# --- sweep 19b ------------------------------------------------------------------------------------------------------

def test_save_model_refuses_a_model_load_weights_could_not_read_back(tmp_path):
    """A config or a weight changed by hand was written, then refused on load; a sparse weight raised torch's own
    NotImplementedError; an Upscaler's scale set to 2.0 raised numpy's TypeError."""
    import dataclasses
    from refsr_cli.errors import RefsrError

    def reset_bias(m):
        del m.trunk.head.bias
        m.trunk.head.bias = None

    def sparse(m):
        m.trunk.head.weight = torch.nn.Parameter(m.trunk.head.weight.data.to_sparse(), requires_grad=False)

    for change in (lambda m: setattr(m, "config", dataclasses.replace(m.config, z_dim=m.config.z_dim * 2)),
                   reset_bias, lambda m: m.trunk.head.register_buffer("extra", torch.zeros(3)), sparse,
                   lambda m: setattr(m.trunk.head, "weight", torch.nn.Parameter(m.trunk.head.weight.data.to(
                       torch.complex64), requires_grad=False))):
        model = tiny_model(2)
        change(model)
        with pytest.raises(RefsrError, match="not those a model of its config has"):
            save_model(model, tmp_path / "changed.safetensors")
    assert list(tmp_path.iterdir()) == []
    up = Upscaler(tiny_model(2), "cpu")
    up.scale = 2.0
    with pytest.raises(RefsrError, match="is not as made"):
        up.upscale(np.random.default_rng(0).random((16, 16, 3)).astype(np.float32), [None])


# --- sweep 20a ------------------------------------------------------------------------------------------------------

def test_a_local_weights_file_named_shipped_is_in_the_redo_command(tmp_path, checkpoint, monkeypatch):
    """The record said "shipped", which is the shipped weights: the redo left --weights out and made another image."""
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copy(checkpoint, "shipped")
    write_png(tmp_path / "a.png", 16, 16)
    assert run("upscale", "a.png", "--scale", 2, "--weights", "shipped", "-o", "out", "-q").exit_code == 0
    result = run("info", "out/a_x2.png")
    assert result.exit_code == 0 and "refsr upscale a.png --scale 2 --weights ./shipped" in result.output


def test_info_and_eval_write_names_that_are_not_utf8_on_a_strict_stdout(tmp_path, checkpoint):
    """Under en_US.UTF-8 (stdout strict, unlike C.UTF-8's surrogateescape) both ended in 'internal error'."""
    import os
    hr = tmp_path / "hr"
    hr.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    write_png(hr / name, 32, 32)
    strict = {"PYTHONIOENCODING": "utf-8"}
    done = refsr_process("upscale", "hr", "--scale", 2, "--weights", checkpoint, "-o", "out", "-q", cwd=tmp_path,
                         env=strict)
    assert done.returncode == 0, done.stderr
    done = refsr_process("info", os.fsdecode(b"out/caf\xe9_x2.png"), cwd=tmp_path, env=strict, text=False)
    assert done.returncode == 0, done.stderr
    assert b"out/caf\xe9_x2.png\n" in done.stdout  # the name's own bytes, as ls writes them
    assert b"redo               refsr upscale $'hr/caf\\xe9.png' --scale 2 --weights" in done.stdout
    done = refsr_process("eval", "hr", "--scale", 2, "--weights", checkpoint, "--device", "cpu", cwd=tmp_path,
                         env=strict, text=False)
    assert done.returncode == 0 and b"caf\xe9" in done.stdout, done.stderr


def test_an_input_that_is_no_longer_a_regular_file_is_refused_not_waited_on(tmp_path, checkpoint):
    """A file that became a FIFO after it was listed hung the batch in the hash's open(); a read's EIO (a failing
    disk, /proc/self/mem) was reported as 'cannot write to standard output', exit 1 for the weights."""
    import os
    import signal
    from refsr_cli.errors import RefsrError
    from refsr_cli.files import read_unchanged
    os.mkfifo(tmp_path / "fifo.png")

    def waited(*_):
        raise TimeoutError("waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(20)  # (before: waited for a writer forever)
    try:
        with pytest.raises(RefsrError, match="fifo.png: not a regular file"):
            read_unchanged(tmp_path / "fifo.png", lambda p: None)
        with pytest.raises(RefsrError, match=f"{tmp_path}: is a folder"):  # (sweep 21b: it named descriptor "3")
            read_unchanged(tmp_path, lambda p: None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    photo = write_png(tmp_path / "in.png", 16, 16)
    result = run("upscale", photo, "--scale", 2, "--weights", "/proc/self/mem", "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "/proc/self/mem: cannot be read (Input/output error)")
    result = run("upscale", "/proc/self/mem", photo, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o",
                 "-q")
    assert result.exit_code == 1 and (tmp_path / "o" / "in_x2.png").exists()
    one_error_line(result, "/proc/self/mem: cannot be read (Input/output error)")


def test_a_full_disk_while_logging_or_resuming_is_one_line_not_an_internal_error(tmp_path, checkpoint, monkeypatch):
    """The log's close() tried the failed row again and its OSError replaced the line; a --resume's rewrite of the
    log raised a raw OSError."""
    from contextlib import contextmanager
    from refsr_cli import train
    args = train_args(tmp_path, "--pool-size", 2, "--imle-samples", 2, "--log-every", 1)
    monkeypatch.setattr(train, "open_log", lambda *a: open("/dev/full", "a"))  # opened, and every flush fails
    result = run(*args, "--init", checkpoint)
    assert result.exit_code == 2
    one_error_line(result, "cannot write /dev/full (No space left on device); the last checkpoint is kept")
    monkeypatch.undo()
    assert run(*args, "--init", checkpoint, "--steps", 2, "--save-every", 1, "--overwrite").exit_code == 0
    log = (tmp_path / "run" / "log.jsonl").read_bytes()

    @contextmanager
    def full_disk(path):
        yield "/dev/full"

    monkeypatch.setattr(train, "atomic_path", full_disk)
    result = run(*args, "--steps", 3, "--resume")
    assert result.exit_code == 2
    one_error_line(result, "log.jsonl (No space left on device); it is kept as it was")
    assert (tmp_path / "run" / "log.jsonl").read_bytes() == log


def test_sample_refs_into_one_file_names_the_real_trouble(tmp_path, checkpoint):
    """It said 'one.png would be written twice, for a.png and for a.png'."""
    photo = write_png(tmp_path / "a.png", 16, 16)
    refs = [write_png(tmp_path / f"r{i}.png", 32, 32, seed=i) for i in range(2)]
    result = run("sample", photo, "--n", 1, "--ref", refs[0], "--ref", refs[1], "--scale", 2, "--weights",
                 checkpoint, "-o", tmp_path / "one.png")
    assert result.exit_code == 2
    one_error_line(result, "one.png names one file, but this run writes 2; give a folder")
    assert not (tmp_path / "one.png").exists()


def test_the_sweeps_cosmetic_findings(tmp_path, checkpoint):
    """--no-consistency beside another --consistency-steps silently meant 0; a TIFF's pages were 'animated frames';
    push of one file named twice said 'both x2 checkpoints'; eval's table read a name's [b] as markup and broke its
    row at a newline."""
    from PIL import Image
    photo = write_png(tmp_path / "a.png", 16, 16)
    result = run("upscale", photo, "--scale", 2, "--weights", checkpoint, "--no-consistency", "--consistency-steps",
                 8, "-o", tmp_path / "o")
    assert result.exit_code == 2
    one_error_line(result, "--no-consistency and --consistency-steps 8: choose one")
    pages = [Image.open(photo).convert("RGB")] * 2
    pages[0].save(tmp_path / "pages.tiff", save_all=True, append_images=pages[1:])
    result = run("upscale", tmp_path / "pages.tiff", "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 0 and "pages.tiff: 2 pages; only the first page is upscaled" in result.stderr
    (tmp_path / "sub").mkdir()
    result = run("push", checkpoint, tmp_path / "sub" / ".." / checkpoint.name, "me/x")  # (it said: both x2 ones)
    assert result.exit_code == 2
    one_error_line(result, "are one file, named twice; name it once")
    import os
    os.link(checkpoint, tmp_path / "hard.safetensors")  # a hard link is one file too (it said: both x2 ones)
    result = run("push", checkpoint, tmp_path / "hard.safetensors", "me/x")
    assert result.exit_code == 2
    one_error_line(result, "are one file, named twice; name it once")
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "[b]x\ny.png", 32, 32)
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--device", "cpu")
    assert result.exit_code == 0 and "[b]x\\ny.png" in result.output
    assert not any(line.startswith("y.png") for line in result.output.splitlines())


# --- sweep 20b (engine and checkpoints) -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool])
def test_weights_that_are_not_real_floats_are_refused_on_load_naming_the_file(tmp_path, checkpoint, dtype):
    """A complex weight's nan passed the finite check (and torch warned that it dropped the imaginary part); int
    and bool weights were taken as numbers."""
    from safetensors import safe_open
    from refsr_cli.errors import RefsrError
    tensors = load_file(checkpoint)
    name = "trunk.head.bias" if "trunk.head.bias" in tensors else sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    if dtype == torch.complex64:
        tensors[name][0] = complex(float("nan"), 0)
    with safe_open(checkpoint, "pt") as f:
        save_file(tensors, tmp_path / "odd.safetensors", metadata=f.metadata())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RefsrError, match=rf"odd.safetensors: its weights are not all floating-point numbers "
                                             rf"\({name} is {str(dtype).removeprefix('torch.')}\)"):
            load_weights(tmp_path / "odd.safetensors")


def test_a_luma_set_on_an_upscaler_changes_nothing(tmp_path):
    """Upscaler.LUMA was a class attribute the grayscale output read through self: a nan set there gave black."""
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    before = up.upscale(lr, [None], grayscale=True)
    up.LUMA = torch.full((1, 3, 1, 1), float("nan"))
    assert np.array_equal(up.upscale(lr, [None], grayscale=True)[0], before[0]) and before[0].any()


@pytest.mark.parametrize("error, fragment", [
    (OSError(28, "No space left on device"), "no space left for the download in the Hugging Face cache"),
    (TimeoutError("timed out"), "download failed (timed out; HF_HUB_DOWNLOAD_TIMEOUT=SECONDS waits longer)")])
def test_a_download_that_fails_on_the_disk_or_stalls_says_what_helps(monkeypatch, error, fragment):
    """A full disk advised HF_HUB_OFFLINE=1, and a stalled download did not name the timeout that bounds it."""
    import huggingface_hub
    from refsr_cli.errors import RefsrError
    from refsr_cli.hub import download_from_hub

    def failing(**kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(RefsrError) as caught:
        download_from_hub("owner/repo", "refsr-x2.safetensors", None)
    assert fragment in str(caught.value) and ("OFFLINE" not in str(caught.value)) == (error.errno == 28)


def test_a_hub_commit_that_is_not_a_hash_is_not_recorded_as_a_pin():
    """A server's X-Repo-Commit of "main" was recorded as owner/repo@main:FILE, whose redo follows the branch."""
    from refsr_cli.checkpoint import recorded_weights
    from refsr_cli.hub import import_hub
    snapshots = Path(import_hub().HF_HUB_CACHE).expanduser().resolve() / "models--owner--repo" / "snapshots"
    assert recorded_weights("owner/repo", snapshots / "main" / "refsr-x2.safetensors") == "owner/repo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert recorded_weights("owner/repo", snapshots / commit / "x.safetensors") == f"owner/repo@{commit}:x.safetensors"


@pytest.mark.parametrize("rank", ["00", "-0"])
def test_train_under_a_launcher_rank_written_00_reports(tmp_path, checkpoint, monkeypatch, rank):
    """Rank 0 alone reports: RANK=00 or -0 (rank 0, as the launcher parses it) was taken for another rank, and quiet."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = [a for a in train_args(tmp_path, "--init", checkpoint, "--pool-size", 2, "--imle-samples", 2) if a != "-q"]
    result = run(*args)
    assert result.exit_code == 0 and "wrote " in result.output, result.output


# --- sweep 21a ------------------------------------------------------------------------------------------------------

def test_an_opaque_animation_or_sheet_of_a_transparent_input_is_said(tmp_path, checkpoint):
    """The animation and the sheet dropped the alpha without a word (the README: transparency is kept)."""
    from PIL import Image
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:, 8:, 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    for args, what in ((("walk", "--seed", 1, "--seed", 2, "--steps", 2, "--animate", "gif"), "animation"),
                       (("sample", "--n", 2, "--sheet"), "contact sheet")):
        result = run(*args[:1], tmp_path / "half.png", *args[1:], "--scale", 2, "--weights", checkpoint, "-o",
                     tmp_path / what.replace(" ", "-"))
        assert result.exit_code == 0
        assert f"half.png: its transparency is kept in the images, not in the {what}, which is opaque" in result.stderr
    assert Image.open(tmp_path / "animation" / "half_x2_walk000.png").mode == "RGBA"


def test_eval_refuses_two_copies_of_one_reference(tmp_path, checkpoint):
    """Two copies forced the reference influence to chance, printed as a measurement."""
    import shutil
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", 32, 32)
    ref = write_png(tmp_path / "r1.png", 40, 40, seed=3)
    shutil.copy(ref, tmp_path / "r2.png")
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--device", "cpu", "--ref", ref, "--ref",
                 tmp_path / "r2.png")
    assert result.exit_code == 2
    one_error_line(result, "r1.png and --ref", "r2.png are the same image")


def test_info_names_pages_missing_files_and_folders_as_such(tmp_path, checkpoint):
    """A two-page TIFF was 'an animation'; a missing file was named twice; a folder was 'not a regular file'."""
    from PIL import Image
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "--format", "tiff", "-o", out, "-q").exit_code == 0
    image = Image.open(out / "in_x2.tiff")
    image.load()
    image.save(tmp_path / "pages.tiff", save_all=True, append_images=[image.copy()], tiffinfo=image.tag_v2)
    for name, fragment in (("pages.tiff", "describes one image, and this file has 2 pages"),
                           ("nothere.png", "nothere.png: no such file"), ("out", "out: is a folder, not an image")):
        result = run("info", tmp_path / name)
        assert result.exit_code == 1
        one_error_line(result, fragment)


# --- sweep 22b (the Python API) ------------------------------------------------------------------------------------

def with_extra_tensor(source: Path, target: Path, name: str, count: int) -> Path:
    """`source` with one more float32 tensor of `count` numbers declared in its header; the file is sparse, so
    nothing of it is on disk."""
    import struct
    data = source.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [len(body), len(body) + 4 * count]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
        f.truncate(8 + len(text) + len(body) + 4 * count)
    return target


def test_a_checkpoint_with_a_huge_extra_tensor_is_refused_before_its_data_is_read(tmp_path, checkpoint, monkeypatch):
    """A sane config beside one extra tensor declared at 2 GiB (a sparse file): every tensor was read, 6 GB of
    memory, before the names were compared."""
    from refsr_cli import checkpoint as checkpoint_module
    from refsr_cli.checkpoint import load_weights
    from refsr_cli.errors import RefsrError
    huge = with_extra_tensor(checkpoint, tmp_path / "huge.safetensors", "zz_extra", 1 << 27)  # 512 MiB
    read = []
    monkeypatch.setattr(checkpoint_module, "load_file", lambda *args: read.append(args) or {})
    with pytest.raises(RefsrError, match=r"unexpected \['zz_extra'\]"):
        load_weights(huge)
    assert read == []  # refused from the header


@pytest.mark.parametrize("name, fragment", [("zz.huge", "holds zz.huge, which a training state"),
                                            ("module.zz_extra", "more than a training state of its config holds")])
def test_a_training_state_with_a_huge_extra_tensor_is_refused_before_its_data_is_read(tmp_path, monkeypatch, name,
                                                                                      fragment):
    """--resume read a state whole (16 GB of memory for a 6 GB tensor declared in it), then ignored a tensor of an
    unknown part."""
    from refsr_cli import train as train_module
    from refsr_cli.errors import RefsrError
    from refsr_cli.train import STATE_FILE, fit, recipe
    from test_train import trunk_options
    data, out = (photos(tmp_path / "photos"), None), tmp_path / "run"
    fit(trunk_options(data, out, scales=(2,), steps=1, save_every=1))
    state = out / STATE_FILE
    with_extra_tensor(state, tmp_path / "big.safetensors", name, 1 << 28).replace(state)  # 1 GiB
    read = []
    monkeypatch.setattr(train_module, "read_weights", lambda *args: read.append(args) or {})
    with pytest.raises(RefsrError, match=fragment):
        train_module.load_training_state(state, recipe(trunk_options(data, out, scales=(2,), steps=2, save_every=1,
                                                                     resume=True)))
    assert read == []


def test_a_hosts_float64_default_dtype_is_refused_not_computed_with(tmp_path):
    """Under torch.set_default_dtype(torch.float64), a Texture output raised torch's "expected m1 and m2 to have
    the same dtype", and prior_z drew another z for the same seed."""
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr, ref = rng.random((16, 16, 3)).astype(np.float32), rng.random((64, 64, 3)).astype(np.float32)
    bank, z = up.reference_bank(ref), up.prior_z(1, 1.0)
    prepared = prepare_reference(ref, 2, "ref")
    torch.set_default_dtype(torch.float64)
    try:
        for call in (lambda: up.prior_z(1, 1.0), lambda: up.upscale(lr, [Texture(bank)]),
                     lambda: up.upscale(lr, [z]), lambda: up.reference_z(ref),
                     lambda: correspond(torch.from_numpy(lr).permute(2, 0, 1)[None], [prepared], 2)):
            with pytest.raises(RefsrError, match="default dtype is float64"):
                call()
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(up.prior_z(1, 1.0).z, z.z)


@pytest.mark.parametrize("name", ["l1", "l1/x.safetensors"])
def test_save_model_into_a_loop_of_links_is_one_line(tmp_path, name):
    """Path.resolve's RuntimeError ("Symlink loop from ...") came out raw, with a traceback."""
    from refsr_cli.errors import RefsrError
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    with pytest.raises(RefsrError, match="loop of symbolic links|Too many levels of symbolic links"):  # (3.13: ELOOP)
        save_model(tiny_model(2), tmp_path / name)


def test_a_transfer_beside_a_texture_output_is_refused_not_ignored(tmp_path):
    """upscale(lr, [Texture(bank)], transfer=T) gave the Texture output without T, exit as if blended."""
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu")
    rng = np.random.default_rng(0)
    lr, ref = rng.random((16, 16, 3)).astype(np.float32), rng.random((64, 64, 3)).astype(np.float32)
    transfer = correspond(torch.from_numpy(lr).permute(2, 0, 1)[None], [prepare_reference(ref, 2, "ref")], 2)
    with pytest.raises(RefsrError, match="not into a Texture's"):
        up.upscale(lr, [None, Texture(up.reference_bank(ref))], transfer=transfer)
    assert len(up.upscale(lr, [None], transfer=transfer)) == 1  # decoded outputs take it


def test_a_walk_between_temperature_0_ends_is_one_line():
    """prior_z(seed, 0) has no z (the fidelity output): walk_latent raised a raw AttributeError on it."""
    from refsr_cli.engine import walk_latent
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    with pytest.raises(RefsrError, match="walk_latent: .*at 0 there is no z"):
        walk_latent(up.prior_z(0, 0), up.prior_z(1, 0), 0.5, True)
    assert walk_latent(up.prior_z(0, 1.0), up.prior_z(1, 1.0), 0.5, True).z is not None


# --- sweep 23b (the Python API and the Hub) ------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="a torch without float4")
def test_a_float4_weight_is_refused_naming_the_file(tmp_path, checkpoint):
    """torch cannot convert float4 to float32: loading (and upscale, eval, push, train --init) read 'internal error
    (NotImplementedError: "copy_kernel" not implemented ...)'."""
    from safetensors import safe_open
    from refsr_cli.errors import RefsrError
    tensors = load_file(checkpoint)
    name = next(k for k, v in sorted(tensors.items()) if v.dim() == 1 and len(v) % 2 == 0)
    # Two numbers a byte: the header's shape is the unpacked count, the same as the float32 tensor's.
    tensors[name] = torch.zeros(len(tensors[name]) // 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with safe_open(checkpoint, "pt") as f:
        save_file(tensors, tmp_path / "f4.safetensors", metadata=f.metadata())
    with pytest.raises(RefsrError, match=rf"f4.safetensors: {name} is float4_e2m1fn_x2, numbers refsr cannot read"):
        load_weights(tmp_path / "f4.safetensors")


@pytest.mark.parametrize("setting", ["meta device", "autocast"])
def test_a_hosts_default_device_or_autocast_is_refused_not_computed_with(tmp_path, checkpoint, setting):
    """torch.set_default_device("meta") had load_weights return a model of meta tensors (its file's sha256 beside
    it, a flood of warnings) and upscale raise "Cannot copy out of meta tensor"; under torch.autocast the outputs
    differed from the same call's outside it, by up to 16 levels."""
    import contextlib
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    lr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    if setting == "meta device":
        torch.set_default_device("meta")
        undo = contextlib.ExitStack()
        undo.callback(torch.set_default_device, None)
    else:
        undo = contextlib.ExitStack()
        undo.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    with undo:
        for call in (lambda: load_weights(checkpoint), lambda: up.upscale(lr, [None]), lambda: up.prior_z(1, 1.0)):
            with pytest.raises(RefsrError, match="default device is meta|an autocast is on"):
                call()
    assert up.upscale(lr, [None])[0].any()  # as before, outside


# --- sweep 23a (the commands) --------------------------------------------------------------------------------------

def test_a_texture_init_inside_out_is_not_said_to_be_written_over(tmp_path, checkpoint):
    """The texture stage saves last.safetensors alone: an --init of k/x2.safetensors with --out k was refused as
    'this run would write over it'; the folder holds another run's checkpoint, which is the reason."""
    out = tmp_path / "k"
    out.mkdir()
    (out / "x2.safetensors").write_bytes(checkpoint.read_bytes())
    result = run(*train_args(tmp_path, "--out", out, "--init", out / "x2.safetensors"))
    assert result.exit_code == 2
    one_error_line(result, "holds a run already (x2.safetensors)")
    assert "write over" not in result.stderr


def test_a_walk_animation_is_not_made_of_kept_frames_of_another_tile(tmp_path, checkpoint):
    """check_sidecars ignored the tile, for a GPU retry within one run: frames an earlier walk made with --tile 16
    were kept, and the animation recorded tile 256; at --tile-pad 0 its redo differed by 105 grey levels."""
    lr, out = write_png(tmp_path / "in.png", 40, 48), tmp_path / "o"
    args = ("walk", lr, "--seed", 1, "--seed", 2, "--steps", 3, "--scale", 2, "--tile-pad", 0, "--weights",
            checkpoint, "-o", out)
    assert run(*args, "--tile", 16, "-q").exit_code == 0
    result = run(*args, "--animate", "gif", "--skip-existing", "-q")
    assert result.exit_code == 1
    one_error_line(result, "in_x2_walk000.png: kept by --skip-existing, but not frame 0 of this walk")
    assert not (out / "in_x2_walk.gif").exists()
    assert run(*args, "--tile", 16, "--animate", "gif", "--skip-existing", "-q").exit_code == 0  # its own tile


@pytest.mark.parametrize("sidecar", ["map", "animation"])
def test_images_are_not_written_anew_beside_another_runs_sidecar(tmp_path, checkpoint, sidecar):
    """A later run that did not ask for the map (or the animation) rewrote the images and left the other run's
    sidecar beside them, telling of other references (other seeds), with or without --overwrite."""
    lr, out = write_png(tmp_path / "in.png", 24, 24), tmp_path / "o"
    refs = [write_png(tmp_path / f"r{i}.png", 32, 32, seed=5 + i) for i in range(2)]
    common = ("--scale", 2, "--weights", checkpoint, "-o", out, "-q")
    if sidecar == "map":
        first = ("upscale", lr, "--ref", refs[0], "--match", "--match-map", *common)
        later, kept = ("upscale", lr, "--ref", refs[1], "--match", *common), "in_x2_match_map.png"
    else:
        first = ("walk", lr, "--seed", 1, "--seed", 2, "--steps", 2, "--animate", "gif", *common)
        later, kept = ("walk", lr, "--seed", 5, "--seed", 6, "--steps", 2, *common), "in_x2_walk.gif"
    assert run(*first).exit_code == 0
    for extra in ((), ("--overwrite",)):
        if not extra:  # the images gone, the sidecar left: written anew without --overwrite
            for image in (p for p in out.iterdir() if p.name != kept):
                image.unlink()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = run(*later, *extra)
        assert result.exit_code == 1
        one_error_line(result, kept, "another run's")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run(*first[:-1], "--overwrite").exit_code == 0  # its own run: the sidecar tells of these images


# --- sweep 24a (the commands) --------------------------------------------------------------------------------------

def test_eval_json_never_writes_a_reference_num_refs_leaves_out(tmp_path, checkpoint):
    """--json was compared with the references --num-refs kept: one it left out became eval's JSON, exit 0."""
    hr, refs = tmp_path / "hr", tmp_path / "refs"
    hr.mkdir()
    refs.mkdir()
    write_png(hr / "h.png", 32, 32)
    for i in range(3):
        write_png(refs / f"r{i}.png", 40, 40, seed=3 + i)
    before = (refs / "r2.png").read_bytes()
    result = run("eval", hr, "--scale", 2, "--weights", checkpoint, "--device", "cpu", "--ref", refs,
                 "--num-refs", 2, "--json", refs / "r2.png", "--overwrite")
    assert result.exit_code == 2
    one_error_line(result, "r2.png is an input of this run")
    assert (refs / "r2.png").read_bytes() == before


@pytest.mark.parametrize("case", ["other format", "one file", "not refsr's"])
def test_a_sidecar_of_other_files_does_not_stop_a_run(tmp_path, checkpoint, case):
    """23a's check of others' sidecars refused runs that do not touch them: another --format's frames, -o naming
    one file, and a user's file at the sidecar's name were each called 'another run's animation of these images'."""
    lr, out = write_png(tmp_path / "a.png", 24, 24), tmp_path / "w"
    walk = ("walk", lr, "--seed", 0, "--seed", 1, "--steps", 2, "--scale", 2, "--weights", checkpoint, "-q")
    if case == "other format":
        assert run(*walk, "--animate", "webp", "-o", out).exit_code == 0
        later = (*walk, "--format", "tiff", "-o", out)
    elif case == "one file":
        ref = write_png(tmp_path / "r.png", 32, 32, seed=5)
        upscale = ("upscale", lr, "--match", "--scale", 2, "--weights", checkpoint, "-q")
        assert run(*upscale, "--ref", ref, "--match-map", "-o", out).exit_code == 0
        later = (*upscale, "--ref", write_png(tmp_path / "r2.png", 32, 32, seed=6), "-o", out / "other.png")
    else:
        out.mkdir()
        (out / "a_x2_walk.webp").write_text("my notes")
        later = (*walk, "-o", out)
    kept = {p.name: p.read_bytes() for p in out.iterdir() if "walk.webp" in p.name or "map" in p.name}
    result = run(*later)
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_gpu_or_half_precision_run_is_recorded_and_redone_so(tmp_path, checkpoint):
    """Records left out --device and --half, which change the pixels (float16 by up to 35 dB's worth): the redo
    of a --half output made float32 pixels, and a walk without --half took --half frames as its own."""
    from PIL import Image
    from refsr_cli.provenance import DamagedRecord, check, redo_command
    lr, out = write_png(tmp_path / "in.png", 16, 16), tmp_path / "out"
    assert run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
    record = json.loads(Image.open(out / "in_x2.png").info["refsr"])
    assert "device" not in record and "half" not in record  # a CPU run's record is as it was
    gpu = check(record | {"device": "cuda", "half": True})
    assert "--device cuda --half" in redo_command(gpu)
    with pytest.raises(DamagedRecord, match="device"):
        check(record | {"device": "tpu"})
    (tmp_path / "edited").mkdir()  # no command writes half without device: --half is refused on the CPU
    result = run("info", image_with_record(tmp_path / "edited", checkpoint, {"half": True}))
    assert result.exit_code == 1
    one_error_line(result, "--half on the CPU")


# --- sweep 24b (the Python API and the Hub) ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["no part index", "fifo"])
def test_a_damaged_texture_bank_is_one_line(tmp_path, damage):
    """A bank tensor x2.cells (no part index) read 'internal error (IndexError)'; a FIFO at the bank's name hung
    sample for good, deaf to SIGTERM."""
    import os
    from safetensors.torch import load_file, save_file
    from refsr_cli.analogy import TEXTURE_BANK, load_bank
    from refsr_cli.checkpoint import weights_dir
    from refsr_cli.errors import RefsrError
    path = tmp_path / "bank.safetensors"
    if damage == "fifo":
        os.mkfifo(path)
    else:
        tensors = load_file(weights_dir() / TEXTURE_BANK.format(scale=2))
        tensors |= {"x2.cells": tensors["x2.0.cells"].clone(), "x2.residual": tensors["x2.0.residual"].clone()}
        save_file(tensors, path)
    with pytest.raises(RefsrError, match="not a bank part|not a regular file"):
        load_bank(path, 2)


def test_walk_latent_checks_its_arguments():
    """walk_latent took t="0.5" or None (TypeError), z of another shape (torch's RuntimeError), a str z
    (AttributeError), and from_prior="no" as True."""
    from refsr_cli.engine import Latent, walk_latent
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu")
    a, b = up.prior_z(0, 1.0), up.prior_z(1, 1.0)
    for args, fragment in [((a, b, "0.5", True), "t"), ((a, b, None, True), "t"), ((a, b, 2.0, True), "t"),
                           ((a, b, 0.5, "no"), "from_prior"), ((a, Latent(torch.zeros(1, 7)), 0.5, True), "one shape"),
                           ((Latent("z"), b, 0.5, True), "float tensors")]:
        with pytest.raises(RefsrError, match=fragment):
            walk_latent(*args)
    assert torch.equal(walk_latent(a, b, 0.0, True).z, a.z)


def test_a_config_whose_condition_map_is_absurd_is_refused_on_load(tmp_path, checkpoint):
    """cond_grid 1 and cond_period 1024, each within its bound and a model of few weights, asked for a 64 x 3072 x
    3072 map a sample: 3.9 GB for a 24-pixel input (38 GB at 1024 channels), and the message blamed the input."""
    import dataclasses
    from safetensors import safe_open
    from refsr_cli.checkpoint import read_config
    from refsr_cli.errors import RefsrError
    config = dataclasses.replace(read_config(checkpoint), cond_grid=1, cond_period=1024)
    with safe_open(checkpoint, "pt") as f:
        metadata = f.metadata() | {"config": config.to_json()}
    save_file(load_file(checkpoint), tmp_path / "big.safetensors", metadata=metadata)
    with pytest.raises(RefsrError, match="big.safetensors: unusable model config: a condition map of"):
        load_weights(tmp_path / "big.safetensors")


# --- sweep 25b (the Python API and the Hub) ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("consistency_steps", -1), ("consistency_steps", 2.5), ("tile", -16)])
def test_settings_changed_during_a_call_are_not_taken_up_half_way(field, value):
    """_upscale read consistency_steps again for each tile and the tile after the call's check: set meanwhile (an
    on_tile callback, another thread) they gave half-projected images, a raw TypeError, or an unfilled buffer."""
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu", tile=16)
    lr = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    expected = up.upscale(lr, [None])[0]
    calls = []

    def meddle():
        calls.append(1)
        if len(calls) == 1:
            setattr(up, field, value)

    assert np.array_equal(up.upscale(lr, [None], on_tile=meddle)[0], expected)  # the call's settings, throughout
    with pytest.raises(RefsrError, match=field):  # and the next call refuses the field
        up.upscale(lr, [None])


# --- sweep 26b (the Python API and the Hub) ------------------------------------------------------------------------

def test_weights_loaded_in_a_hosts_inference_mode_work_outside_it(tmp_path):
    """An Upscaler or weights made in a host's torch.inference_mode held inference tensors: every image after the
    block was a raw RuntimeError (the weights' scan, then the network). A model built in one is refused in one
    line."""
    from refsr_cli.checkpoint import build_model
    from refsr_cli.errors import RefsrError
    path = tmp_path / "x2.safetensors"
    save_model(tiny_model(2), path)
    lr = np.random.default_rng(0).random((20, 20, 3)).astype(np.float32)
    expected = Upscaler(load_weights(path, 2).model, "cpu").upscale(lr, [None])[0]
    with torch.inference_mode():
        made_inside = Upscaler(load_weights(path, 2).model, "cpu")
        loaded_inside = load_weights(path, 2)
    for up in (made_inside, Upscaler(loaded_inside.model, "cpu")):
        assert np.array_equal(up.upscale(lr, [None])[0], expected)
        with torch.enable_grad():
            assert np.array_equal(up.upscale(lr, [None])[0], expected)
    with torch.inference_mode():
        built_inside = build_model(load_weights(path, 2).model.config)
    with pytest.raises(RefsrError, match="inference_mode"):
        Upscaler(built_inside, "cpu")


@pytest.mark.parametrize("field", ["model", "scale"])
def test_the_network_set_during_a_call_is_refused_not_mixed_in(field):
    """_upscale read self.model and self.scale at each tile: set from an on_tile callback (or another thread), the
    image mixed two networks' tiles (exit 0), or another scale's raised deep inside."""
    from refsr_cli.errors import RefsrError
    up = Upscaler(tiny_model(2), "cpu", tile=16)
    other = Upscaler(tiny_model(2, seed=1) if field == "model" else tiny_model(4), "cpu")
    lr = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)

    def swap():
        up.model = other.model
        if field == "scale":
            up.scale = 4

    with pytest.raises(RefsrError, match="set during this call"):
        up.upscale(lr, [None], on_tile=swap)


def test_the_shipped_texture_bank_follows_the_upscalers_scale():
    """texture_bank() was cached without its scale: an Upscaler given another scale's network since kept the old
    scale's bank, and refused its own bank as made by another Upscaler."""
    up = Upscaler.from_weights(scale=2)
    assert up.texture_bank().scale == 2
    up.model, up.scale = Upscaler.from_weights(scale=4).model, 4
    bank = up.texture_bank()
    assert bank.scale == 4
    lr = np.random.default_rng(0).random((12, 12, 3)).astype(np.float32)
    assert up.upscale(lr, [Texture(bank, seed=1, temperature=1.0)])[0].shape == (48, 48, 3)


def test_a_transfer_set_to_nan_during_a_call_is_refused_not_black_pixels():
    """The blend's output was not checked: a transfer's positions set to nan from an on_tile callback gave black
    pixels (with numpy's cast warning) and no error."""
    from refsr_cli.errors import RefsrError
    from refsr_cli.match import correspond, prepare_reference
    up = Upscaler(tiny_model(2), "cpu", tile=16)
    rng = np.random.default_rng(0)
    lr = rng.random((40, 40, 3)).astype(np.float32)
    made = correspond(torch.from_numpy(lr).permute(2, 0, 1)[None], [prepare_reference(
        rng.random((96, 96, 3)).astype(np.float32), 2)], 2)
    with pytest.raises(RefsrError, match="not finite numbers"):
        up.upscale(lr, [None], transfer=made, on_tile=lambda: made.matches[0].positions.fill_(float("nan")))


# --- sweep 26a (the commands) --------------------------------------------------------------------------------------

def test_a_contact_sheet_labels_a_reference_named_with_a_newline(tmp_path, checkpoint):
    """PIL cannot measure a label of two lines: a reference named r\\nx.png made --sheet an internal error, blamed on
    the input, after all the decoding."""
    lr = write_png(tmp_path / "a.png", 16, 16)
    ref = write_png(tmp_path / "r\nx.png", 24, 24, seed=2)
    for command in (("upscale",), ("sample", "--n", 2)):
        out = tmp_path / f"out-{command[0]}"
        result = run(*command, lr, "--ref", ref, "--sheet", "--scale", 2, "--weights", checkpoint, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        sheet = next(p for p in out.iterdir() if "sheet" in p.name)
        assert run("info", sheet).exit_code == 0


def test_a_redo_names_a_line_break_past_ascii_in_any_locale(tmp_path):
    """U+0085, U+2028 and U+2029 were written \\uXXXX in $'...', which bash reads as the character only in a UTF-8
    locale: under LC_ALL=C (cron, many containers) the redo named a file that does not exist."""
    import subprocess
    from refsr_cli.provenance import shell_word
    for name in ("nel\x85ref.png", "ls\u2028x.png", "p\u2029.png", "é\x85\n.png"):
        said = subprocess.run(["bash", "-c", f"printf %s {shell_word(name)}"], capture_output=True,
                              env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
        assert said == name.encode(), (name, said)


def test_info_refuses_records_whose_redo_would_drop_part_of_them(tmp_path, checkpoint):
    """No command writes these, and the redo dropped the part: a walk's reference end with a seed (walk takes --ref
    or --seed; the redo drew seed 0), --match's map or sha256 without its references, a reference's sha256 without
    the reference."""
    from refsr_cli.provenance import DamagedRecord, check
    for i, (changes, fragment) in enumerate([
            ({"match_map": True}, "without its references"),
            ({"references_sha256": ["0" * 64]}, "without its references"),
            ({"reference_sha256": "0" * 64}, "without the reference")]):
        (tmp_path / str(i)).mkdir()
        result = run("info", image_with_record(tmp_path / str(i), checkpoint, changes))
        assert result.exit_code == 1, (changes, result.output)
        one_error_line(result, fragment)
    lr = write_png(tmp_path / "w.png", 16, 16)
    refs = [write_png(tmp_path / f"r{i}.png", 24, 24, seed=5 + i) for i in range(2)]
    out = tmp_path / "walk"
    assert run("walk", lr, "--ref", refs[0], "--ref", refs[1], "--steps", 2, "--scale", 2, "--weights", checkpoint,
               "-o", out, "-q").exit_code == 0
    frame = sorted(out.glob("*.png"))[0]
    from PIL import Image
    record = json.loads(Image.open(frame).info["refsr"])
    check(record)  # as walk wrote it
    with pytest.raises(DamagedRecord, match="a walk between references with a seed"):
        check(record | {"from": record["from"] | {"seed": 5}})


def test_train_waiting_for_ranks_that_never_come_ends_at_sigterm(tmp_path):
    """init_process_group waits in C++ (30 minutes by default), where Python's handlers do not run: a train with
    RANK=0 WORLD_SIZE=2 and no other rank ignored SIGTERM and SIGINT; only SIGKILL ended it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(a) for a in train_args(tmp_path, "--stage", "trunk")]
    args[args.index("--scale"):args.index("--scale") + 2] = ["--scales", "2"]
    env = os.environ | {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "refsr_cli", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # rank 0 listens on MASTER_PORT once it waits for the others
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("rank 0 never started to wait")
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 143
    assert stderr == "refsr: error: terminated\n"
    assert not (tmp_path / "run").exists()


def test_a_rank_that_stops_is_named_by_the_others_not_an_internal_error(tmp_path):
    """gloo's "Connection closed by peer" when another rank died read "internal error, please report it"."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(a) for a in train_args(tmp_path, "--stage", "trunk")]
    args[args.index("--scale"):args.index("--scale") + 2] = ["--scales", "2"]
    args[args.index("--steps") + 1] = "100000"
    ranks = [subprocess.Popen([sys.executable, "-m", "refsr_cli", *args], stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "run").exists() and time.monotonic() < deadline:  # the ranks have met
            time.sleep(0.2)
        time.sleep(3)
        ranks[1].send_signal(signal.SIGKILL)  # as a crash
        _, stderr = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode == 2, stderr  # (as train's other failures: a full disk, a diverged loss)
    assert stderr.count("\n") == 1 and stderr.startswith("refsr: error: another rank of this run stopped"), stderr
    assert "internal error" not in stderr and "pair.cc" not in stderr, stderr
    # --resume only where there is a checkpoint to resume (it said so before the first one too)
    from refsr_cli.train import STATE_FILE
    saved = (tmp_path / "run" / STATE_FILE).is_file()
    assert ("continue with --resume" in stderr) == saved and ("nothing to resume" in stderr) != saved, stderr


# --- sweep 27b (the Python API and the Hub) ------------------------------------------------------------------------

def test_a_walk_from_a_reference_z_to_a_z_that_requires_grad():
    """reference_z's z is an inference tensor: a slerp to a z that requires grad was a raw 'Inference tensors cannot
    be saved for backward'."""
    from refsr_cli.engine import Latent, walk_latent
    up = Upscaler(tiny_model(2), "cpu")
    reference = up.reference_z(np.random.default_rng(0).random((48, 48, 3), dtype=np.float32), temperature=0.5)
    z = torch.randn(reference.z.shape, requires_grad=True)
    for ends in ((Latent(z, 0), reference), (reference, Latent(z, 0))):
        for from_prior in (True, False):
            middle = walk_latent(*ends, 0.5, from_prior)
            assert middle.z.shape == reference.z.shape and torch.isfinite(middle.z).all()
    lr = np.random.default_rng(1).random((12, 12, 3)).astype(np.float32)
    assert up.upscale(lr, [walk_latent(Latent(z, 0), reference, 0.5, True)])[0].shape == (24, 24, 3)


# --- sweep 27a (the commands) --------------------------------------------------------------------------------------

def test_a_redo_quotes_a_name_that_zsh_would_expand(tmp_path):
    """shlex leaves a leading '=' bare, and zsh reads =NAME as the path of the command NAME: the redo of =a.png said
    "a.png not found" in zsh (and =python would have named /usr/bin/python)."""
    import shutil
    import subprocess
    from refsr_cli.provenance import shell_word
    shells = [shell for shell in ("bash", "zsh", "dash") if shutil.which(shell)]
    assert "bash" in shells
    for name in ("=a.png", "=python", "a=b.png", "=it's.png"):
        for shell in shells:
            said = subprocess.run([shell, "-c", f"printf %s {shell_word(name)}"], capture_output=True, text=True)
            assert said.stdout == name, (shell, name, said)


def test_info_refuses_a_reference_or_seed_where_no_command_writes_one(tmp_path, checkpoint):
    """A walk keeps its references and seeds in its ends, --match its references in a list, a sheet its references in
    reference_list: a 'reference' or 'seed' beside them was shown by info, and dropped by its redo."""
    from PIL import Image
    from refsr_cli.provenance import DamagedRecord, check
    lr = write_png(tmp_path / "a.png", 16, 16)
    refs = [write_png(tmp_path / f"r{i}.png", 24, 24, seed=5 + i) for i in range(2)]

    def record_of(*args):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert run(*args, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
        return json.loads(Image.open(sorted(out.glob("*.png"))[0]).info["refsr"])

    one = {"reference": str(refs[0]), "reference_sha256": "0" * 64}
    walk = record_of("walk", lr, "--seed", 1, "--seed", 2, "--steps", 2)
    match = record_of("upscale", lr, "--ref", refs[0], "--match")
    assert run("sample", lr, "--ref", refs[0], "--ref", refs[1], "--n", 2, "--sheet", "--scale", 2, "--weights",
               checkpoint, "-o", tmp_path / "sheet", "-q").exit_code == 0
    sheet = json.loads(Image.open(next((tmp_path / "sheet").glob("*sheet*"))).info["refsr"])
    for record in (walk, match, sheet):
        check(record)  # as written
    for edited in (walk | one, walk | {"seed": 9}, match | one, sheet | one):
        with pytest.raises(DamagedRecord, match="no refsr command writes"):
            check(edited)


def test_a_second_ctrl_c_while_refsr_exits_is_no_traceback(tmp_path, checkpoint):
    """The command had said its line; a Ctrl-C after it (a second press) raised KeyboardInterrupt inside torch's
    atexit finalisers: "Exception ignored in atexit callback ... KeyboardInterrupt", a traceback."""
    import subprocess
    import sys
    lr = write_png(tmp_path / "in.png", 12, 12)
    code = ("import atexit, os, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
            f"sys.argv = ['refsr', 'upscale', {str(lr)!r}, '--scale', '2', '--weights', {str(checkpoint)!r}, '-o', "
            f"{str(tmp_path / 'out')!r}, '-q']\n"
            "import torch\n"  # (its finalisers run after the handler above: atexit runs last in, first out)
            "from refsr_cli.__main__ import run\n"
            "run()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "out" / "in_x2.png").is_file()


# --- sweep 28a (the commands) --------------------------------------------------------------------------------------

def test_info_checks_a_sheets_seeds_and_a_walk_ends_keys(tmp_path, checkpoint):
    """A sample sheet's seed beside seeds that do not start at it, or no seeds at all; a walk's seed end holding a
    reference's sha256; an end's sha256 or seed of another type: shown by info, dropped or misread by the redo."""
    from PIL import Image
    from refsr_cli.provenance import DamagedRecord, check
    lr = write_png(tmp_path / "a.png", 16, 16)
    refs = [write_png(tmp_path / f"r{i}.png", 24, 24, seed=5 + i) for i in range(2)]

    def record_of(name, *args):
        assert run(*args, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / name, "-q").exit_code == 0
        return json.loads(Image.open(sorted((tmp_path / name).glob("*.png"))[-1]).info["refsr"])

    sheet = record_of("sheet", "sample", lr, "--n", 3, "--sheet")
    seeds = record_of("seeds", "walk", lr, "--seed", 1, "--seed", 2, "--steps", 2)
    references = record_of("refs", "walk", lr, "--ref", refs[0], "--ref", refs[1], "--steps", 2)
    for record in (sheet, seeds, references):
        check(record)  # as written
    for edited in (sheet | {"seed": 7}, sheet | {"seeds": [], "sheet": []},
                   seeds | {"to": seeds["to"] | {"reference_sha256": "0" * 64}},
                   references | {"from": references["from"] | {"reference_sha256": 5}},
                   references | {"from": references["from"] | {"seed": False}},
                   references | {"from": references["from"] | {"reference_sha256": None}},
                   seeds | {"to": {"seed": 2.0}}):
        with pytest.raises(DamagedRecord):
            check(edited)


# --- sweep 29b (the Python API and the Hub) ------------------------------------------------------------------------

def test_weights_replaced_and_replaced_back_while_read_are_refused(tmp_path, monkeypatch):
    """The file was hashed before and after its reads, by name: replaced by another save and then by one of the same
    bytes as before (a script saving two models in turn), it passed, with the other file's tensors in hand, recorded
    under this file's sha256."""
    import os
    import shutil
    from refsr_cli import checkpoint
    from refsr_cli.errors import RefsrError
    live, a, b = tmp_path / "live.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model(tiny_model(2, seed=0), a)
    save_model(tiny_model(2, seed=1), b)
    shutil.copy(a, live)
    real = checkpoint.read_checked

    def swapping(path, scale):
        shutil.copy(b, tmp_path / "next")
        os.replace(tmp_path / "next", live)  # another save: b
        read = real(path, scale)
        shutil.copy(a, tmp_path / "next")
        os.replace(tmp_path / "next", live)  # and a again, byte for byte
        return read

    monkeypatch.setattr(checkpoint, "read_checked", swapping)
    with pytest.raises(RefsrError, match="changed while it was read"):
        load_weights(live, 2)
    monkeypatch.setattr(checkpoint, "read_checked", real)
    assert load_weights(live, 2).sha256 == load_weights(a, 2).sha256


# --- sweep 29a (the commands) --------------------------------------------------------------------------------------

def test_a_fresh_train_refuses_an_out_holding_another_scales_checkpoint(tmp_path, checkpoint):
    """The check listed only this run's own --scales: a fresh --scales 2 wrote x2 beside a run's x8, exit 0, two
    runs in one folder."""
    import shutil
    (tmp_path / "run").mkdir()
    shutil.copy(checkpoint, tmp_path / "run" / "x8.safetensors")
    before = (tmp_path / "run" / "x8.safetensors").read_bytes()
    args = [str(a) for a in train_args(tmp_path, "--stage", "trunk")]
    args[args.index("--scale"):args.index("--scale") + 2] = ["--scales", "2"]
    result = run(*args)
    assert result.exit_code == 2, result.output
    one_error_line(result, "holds a run already", "x8.safetensors")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["x8.safetensors"]
    assert (tmp_path / "run" / "x8.safetensors").read_bytes() == before


def test_an_image_at_a_sidecars_name_is_not_taken_for_another_runs_sidecar(tmp_path, checkpoint):
    """A reference output of --ref match_map.png is named a_x2_match_map.png: a --match run beside it was refused
    as writing images anew beside "another run's map" (and --match-map then said "exists")."""
    lr = write_png(tmp_path / "a.png", 16, 16)
    (tmp_path / "mm").mkdir()
    ref = write_png(tmp_path / "mm" / "match_map.png", 40, 40, seed=3)
    out = tmp_path / "out"
    assert run("upscale", lr, "--ref", ref, "--scale", 2, "--weights", checkpoint, "-o", out, "-q").exit_code == 0
    assert (out / "a_x2_match_map.png").is_file()
    before = (out / "a_x2_match_map.png").read_bytes()
    result = run("upscale", lr, "--ref", ref, "--match", "--scale", 2, "--weights", checkpoint, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert (out / "a_x2_match.png").is_file() and (out / "a_x2_match_map.png").read_bytes() == before


def test_a_sheet_of_too_many_references_is_refused_before_any_is_read(tmp_path, checkpoint, monkeypatch):
    """The tile count was checked after every reference had been read and encoded (110 references: 1m43s, and all
    their banks held), though it is known from the names alone."""
    from refsr_cli import batch
    lr = write_png(tmp_path / "a.png", 16, 16)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(101):
        write_png(refs / f"r{i:03d}.png", 8, 8, seed=i)
    read = []
    real = batch.read_unchanged
    monkeypatch.setattr(batch, "read_unchanged", lambda path, how: (read.append(path), real(path, how))[1])
    for command in (("upscale",), ("sample", "--n", 1)):
        result = run(*command, lr, "--ref", refs, "--sheet", "--scale", 2, "--weights", checkpoint, "-o",
                     tmp_path / "out", "-q")
        assert result.exit_code == 2, result.output
        one_error_line(result, "at most 100 tiles", "gives 101")
    assert read == []
    result = run("upscale", lr, "--ref", refs, "--match", "--sheet", "--scale", 2, "--weights", checkpoint, "-o",
                 tmp_path / "m", "-q")  # --match: one output of all the references, one tile
    assert "at most 100 tiles" not in result.stderr and read, result.output
