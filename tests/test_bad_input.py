"""Issue 29's classes beyond data loss: numbers that are not numbers (in options, losses and weight files), sidecars
and redo commands that must tell the truth, and inputs that used to give a traceback or unbounded work."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_error_line, tiny_model, write_png
from refsr_cli.checkpoint import load_checkpoint, read_metadata, save_model
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
    with pytest.raises(RefsrError, match="^step 2: .*last checkpoint is kept"):
        train.fit(trunk_options((photos(tmp_path / "photos"), None), out, scales=(2,), steps=4, save_every=1))
    assert read_metadata(out / "x2.safetensors")["step"] == "1"
    load_checkpoint(out / "x2.safetensors")  # finite, and loads
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
