"""Issue 29's data-loss classes: nothing a user has is replaced, emptied or left half-written, whoever else writes."""
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, write_png
from test_cli import pngs, run

ROOT = Path(__file__).resolve().parent.parent


def photos(folder: Path, count: int = 2) -> Path:
    folder.mkdir()
    for i in range(count):
        blocks = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((64, 48), Image.NEAREST).save(folder / f"p{i}.png")
    return folder


@pytest.mark.parametrize("name, stage", [("last.safetensors", "texture"), ("x2.safetensors", "trunk")])
def test_train_keeps_a_checkpoint_it_did_not_write(tmp_path, checkpoint, name, stage):
    out = tmp_path / "run"
    out.mkdir()
    mine = out / name
    mine.write_bytes(checkpoint.read_bytes())  # a checkpoint with no training state beside it
    before = mine.read_bytes()
    args = ["train", "--data", photos(tmp_path / "photos"), "--out", out, "--stage", stage, "--scale", 2,
            "--scales", 2, "--steps", 1, "--device", "cpu", "-q"]
    result = run(*args)
    assert result.exit_code == 2
    one_error_line(result, name, "--overwrite")
    assert mine.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [name]


def test_train_overwrite_starts_afresh(tmp_path):
    from refsr_cli.train import fit
    from test_train import trunk_options
    data = (photos(tmp_path / "photos"), None)
    out = tmp_path / "run"
    out.mkdir()
    (out / "x2.safetensors").write_bytes(b"an old checkpoint")
    (out / "log.jsonl").write_text('{"step": 99}\n')
    fit(trunk_options(data, out, scales=(2,), steps=2, save_every=2, overwrite=True))
    assert (out / "x2.safetensors").read_bytes() != b"an old checkpoint"
    assert '"step": 99' not in (out / "log.jsonl").read_text()


@pytest.mark.parametrize("stage, left", [("trunk", "x4.safetensors"), ("trunk", "last.safetensors"),
                                         ("texture", "x2.safetensors")])
def test_train_overwrite_refuses_to_leave_another_runs_checkpoint_beside_its_own(tmp_path, checkpoint, stage, left):
    """--overwrite replaces the checkpoints the run saves; one it would not save (another scale, the other stage's)
    stayed, and the folder mixed two runs (a push of it published both)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in {left, "x2.safetensors" if stage == "trunk" else "last.safetensors"}:
        (out / name).write_bytes(checkpoint.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("train", "--data", photos(tmp_path / "photos"), "--out", out, "--stage", stage, "--scale", 2,
                 "--scales", 2, "--steps", 1, "--device", "cpu", "-q", "--overwrite")
    assert result.exit_code == 2
    one_error_line(result, left, "would not replace")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_outputs_that_would_take_one_name_are_refused_before_anything_is_written(tmp_path, checkpoint):
    a, a_x2 = write_png(tmp_path / "a.png", 16, 16, seed=1), write_png(tmp_path / "a_x2.png", 16, 16, seed=2)
    refs = [write_png(tmp_path / "x2_b.png", 40, 40, seed=3), write_png(tmp_path / "b.png", 40, 40, seed=4)]
    out = tmp_path / "out"
    for extra in ((), ("--overwrite",)):
        result = run("upscale", a, a_x2, "--ref", refs[0], "--ref", refs[1], "--scale", 2, "--weights", checkpoint,
                     "-o", out, *extra)
        assert result.exit_code == 2
        one_error_line(result, "a_x2_x2_b.png", "twice")
        assert pngs(out) == []


def test_a_file_another_process_writes_meanwhile_is_never_replaced(tmp_path, checkpoint, monkeypatch):
    from refsr_cli import batch
    real = batch.write_picture

    def racing(array, path, *args, **kwargs):
        Path(path).write_bytes(b"the other process's file")  # appears after the start-of-run check
        return real(array, path, *args, **kwargs)

    monkeypatch.setattr(batch, "write_picture", racing)
    lr = write_png(tmp_path / "photo.png")
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 1
    one_error_line(result, "photo_x2.png", "appeared")
    assert (tmp_path / "out" / "photo_x2.png").read_bytes() == b"the other process's file"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["photo_x2.png"]  # no temporary file left
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", tmp_path / "out", "--overwrite")
    assert result.exit_code == 0  # asked for: replaced
    Image.open(tmp_path / "out" / "photo_x2.png").load()


@pytest.mark.parametrize("script, table", [("eval_match.sh", "docs/eval/match/x4-val_hr-warp.txt"),
                                           ("eval_release.sh", "docs/eval/x4-val_hr.txt")])
def test_the_eval_scripts_keep_committed_tables_when_refsr_eval_fails(tmp_path, script, table):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / script).write_text((ROOT / "scripts" / script).read_text())
    (repo / table).parent.mkdir(parents=True)
    (repo / table).write_text("the committed table\n")
    committed_json = (repo / table).with_suffix(".json")
    committed_json.write_text('{"committed": true}\n')
    fake = tmp_path / "bin" / "refsr"
    fake.parent.mkdir()
    # As refsr eval does when some images fail: its --json written (with what could be measured), then exit 1.
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --json ] && echo \'{"partial": true}\' > "$2"; shift; '
                    "done\necho 'partial output'\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = os.environ | {"PATH": f"{fake.parent}:{os.environ['PATH']}", "SETS": "val_hr", "SCALES": "4",
                        "PROTOCOLS": "warp"}
    done = subprocess.run(["bash", str(repo / "scripts" / script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert (repo / table).read_text() == "the committed table\n"
    assert committed_json.read_text() == '{"committed": true}\n'  # (replaced by the partial one, beside the old table)
    assert sorted(p.name for p in (repo / table).parent.iterdir()) == sorted([Path(table).name, committed_json.name])


def test_eval_front_runs_and_keeps_the_committed_json_when_refsr_eval_fails(tmp_path):
    """scripts/eval_front.sh imported validation_crops from where it no longer is (a traceback before any eval),
    and passed --json onto the committed file, which a failing eval replaced with a partial one."""
    repo, data = tmp_path / "repo", tmp_path / "data"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "eval_front.sh").write_text((ROOT / "scripts" / "eval_front.sh").read_text())
    committed = repo / "docs" / "eval" / "analogy" / "front-valcrops-x8-s0.5-t1.json"
    committed.parent.mkdir(parents=True)
    committed.write_text('{"committed": true}\n')
    (data / "val_hr").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(
        data / "val_hr" / "v.png")
    fake = tmp_path / "bin" / "refsr"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ntouch {tmp_path}/eval-ran\nwhile [ $# -gt 0 ]; do [ "$1" = --json ] && '
                    'echo \'{"partial": true}\' > "$2"; shift; done\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = os.environ | {"PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "DATA": str(data),
                        "STRENGTHS": "0.5", "TEMPERATURES": ""}
    done = subprocess.run(["bash", str(repo / "scripts" / "eval_front.sh")], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and (tmp_path / "eval-ran").exists(), done.stderr  # it got as far as refsr eval
    assert committed.read_text() == '{"committed": true}\n'
    assert [p.name for p in committed.parent.iterdir()] == [committed.name]


def test_sigterm_during_train_keeps_the_last_checkpoint_and_no_temporary_file(tmp_path, checkpoint):
    out = tmp_path / "run"
    # A run long enough to be stopped mid-way, saving every step.
    proc = subprocess.Popen([sys.executable, "-m", "refsr_cli", "train", "--data", str(photos(tmp_path / "photos")),
                             "--out", str(out), "--scale", "2", "--init", str(checkpoint), "--steps", "100000",
                             "--batch", "2", "--lr-patch", "8", "--imle-samples", "2", "--perceptual-crop", "32",
                             "--pool-size", "4", "--save-every", "1", "--device", "cpu", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.state.safetensors").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("refsr: error: terminated"), stderr
    assert all(not p.name.startswith(".") for p in out.iterdir()), sorted(p.name for p in out.iterdir())
    result = run("train", "--data", tmp_path / "photos", "--out", out, "--scale", 2, "--steps", 100000, "--resume",
                 "--device", "cpu", "-q", "--save-every", 100000, "--steps", 1)
    assert "Traceback" not in result.output


def test_a_killed_save_leaves_nothing_the_next_run_keeps(tmp_path, checkpoint):
    from refsr_cli.train import remove_stale_temporaries
    out = tmp_path / "run"
    out.mkdir()
    # Ours: atomic_path's temporary names of a run's files, and safetensors' own holding a refsr header.
    stale = [out / ".last.k2j3ab_9.safetensors.tmp", out / ".log.a1b2c3d4.jsonl.tmp", out / ".tmpAb12_z"]
    for path in stale[:2]:
        path.write_bytes(b"half")
    whole = checkpoint.read_bytes()
    stale[2].write_bytes(whole[:8 + int.from_bytes(whole[:8], "little") + 100])  # the header, some data, the kill
    # The user's, whatever their names: never removed.
    mine = {".tmpnotes": "a user's file", ".tmpABC123": "keep", ".notes.tmp": "my notes",
            ".photo.a1b2c3d4.png.tmp": "another command's"}
    for name, text in mine.items():
        (out / name).write_text(text)
    remove_stale_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(mine)


def test_a_folder_moved_while_a_file_is_written_into_it_keeps_no_temporary(tmp_path, checkpoint, monkeypatch):
    """The temporary was removed by its old name, so it stayed in the moved folder: it is removed through the
    folder, wherever the folder went. And a command says the one line for each input."""
    from refsr_cli import images
    real = images.atomic_path
    out, moved = tmp_path / "out", tmp_path / "moved"
    lr = write_png(tmp_path / "in.png", 16, 16)
    out.mkdir()

    class Moving:
        def __init__(self, path, replace=True):
            self.context = real(path, replace)

        def __enter__(self):
            tmp = self.context.__enter__()
            out.rename(moved)  # as another process might, while the file is being written
            return tmp

        def __exit__(self, *exc):
            return self.context.__exit__(*exc)
    monkeypatch.setattr(images, "atomic_path", Moving)
    result = run("upscale", lr, "--scale", 2, "--weights", checkpoint, "-o", out, "-q")
    assert result.exit_code == 1
    one_error_line(result, "in.png: cannot write the output")
    assert list(moved.iterdir()) == []  # no temporary where the folder went


def test_a_run_killed_between_its_state_and_its_checkpoint_is_finished_by_resume(tmp_path, checkpoint, monkeypatch):
    """A save writes the training state, then the checkpoint: killed between the two at the last step, the run
    said "continue with --resume", and --resume refused ("at step 1 already"), the step's checkpoint never
    written."""
    from refsr_cli.checkpoint import read_metadata
    from refsr_cli.stages import TextureStage
    from test_bad_input import train_args
    out = tmp_path / "run"
    real = TextureStage.export

    def killed(self, step):
        raise KeyboardInterrupt  # the signal, as it arrives between the two writes
    monkeypatch.setattr(TextureStage, "export", killed)
    args = train_args(tmp_path)
    result = run(*args, "--init", checkpoint)
    assert result.exit_code == 130, result.output
    assert (out / "last.state.safetensors").is_file() and not (out / "last.safetensors").exists()
    monkeypatch.setattr(TextureStage, "export", real)
    result = run(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert read_metadata(out / "last.safetensors")["step"] == "1"
    result = run(*args, "--resume")  # and now there is nothing left to do
    assert result.exit_code == 2
    one_error_line(result, "at step 1 already")


def test_a_train_whose_folder_goes_away_does_not_make_it_anew(tmp_path, checkpoint, monkeypatch):
    """Removed between a save's state and its checkpoint, the run folder was made again by the checkpoint's write,
    holding that file alone; and a moved one kept its lock file. A checkpoint's name taken by a folder is refused
    before any step, not at the first save."""
    from refsr_cli import train
    from test_bad_input import train_args
    out, moved = tmp_path / "run", tmp_path / "moved"
    real = train.save_training_state

    def then_moved(path, *args):
        real(path, *args)
        out.rename(moved)  # as a user's mv, while the run saves
    monkeypatch.setattr(train, "save_training_state", then_moved)
    result = run(*train_args(tmp_path, "--init", checkpoint))
    assert result.exit_code == 2, result.output
    one_error_line(result, "was removed or moved while this run trained", "--resume it there")
    assert not out.exists()
    assert sorted(p.name for p in moved.iterdir()) == ["last.state.safetensors", "log.jsonl"]  # no lock left
    monkeypatch.undo()
    (tmp_path / "other" / "last.safetensors").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    result = run(*train_args(tmp_path / "b", "--init", checkpoint, "--out", tmp_path / "other", "--overwrite",
                             "--steps", 5, "--save-every", 5))
    assert result.exit_code == 2, result.output
    one_error_line(result, "last.safetensors: not a regular file")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["last.safetensors"]


def test_a_refused_overwrite_keeps_the_old_runs_state_and_log(tmp_path, checkpoint):
    """--overwrite removed the old run's state and log when it claimed the folder, before the checks that then
    refused the run (its memory, its --init): exit 2, and the old run could no longer be resumed."""
    from test_bad_input import train_args
    out = tmp_path / "run"
    args = train_args(tmp_path, "--init", checkpoint)  # (makes its photos once)
    assert run(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"last.state.safetensors", "log.jsonl"} <= set(before)
    result = run(*args, "--overwrite", "--lr-patch", 100000)
    assert result.exit_code == 2
    one_error_line(result, "--lr-patch 100000")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_release_keeps_the_committed_weights_when_the_copy_fails(tmp_path):
    """scripts/train_release.sh copied each finished checkpoint over OUT's refsr-xS.safetensors in place: with
    OUT=weights, a copy cut midway (a kill, a full disk) left the committed weights truncated."""
    repo, out = tmp_path / "repo", tmp_path / "repo" / "weights"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "train_release.sh").write_text((ROOT / "scripts" / "train_release.sh").read_text())
    out.mkdir()
    (out / "refsr-x2.safetensors").write_bytes(b"the committed weights")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # refsr train: its --out's checkpoint; cp: half of the file, then a full disk.
    (bin_ / "refsr").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && '
                                'echo "new weights, whole" > "$2/last.safetensors"; shift; done\nexit 0\n')
    (bin_ / "cp").write_text('#!/bin/sh\nhead -c 5 "$1" > "$2"\necho "cp: No space left on device" >&2\nexit 1\n')
    for tool in bin_.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = os.environ | {"PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(out), "SCALES": "2"}
    done = subprocess.run(["bash", str(repo / "scripts" / "train_release.sh")], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0, done.stderr
    assert (out / "refsr-x2.safetensors").read_bytes() == b"the committed weights"
    assert sorted(p.name for p in out.iterdir()) == ["refsr-x2.safetensors", "texture-x2", "trunk"]  # no temporary
    (bin_ / "cp").unlink()  # and with a copy that works, the new weights take the name
    assert subprocess.run(["bash", str(repo / "scripts" / "train_release.sh")], env=env).returncode == 0
    assert (out / "refsr-x2.safetensors").read_text() == "new weights, whole\n"
