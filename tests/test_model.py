import pickle
import sys
from pathlib import Path

import pytest
import torch

from conftest import decode_reference, tiny_config, tiny_model
from refsr_cli.checkpoint import build_model, load_weights, read_config, save_model
from refsr_cli.errors import RefsrError
from refsr_cli.model import RefVAE, RefVAEConfig, tile_periodic


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_output_shape_for_each_scale(scale):
    model = tiny_model(scale)
    lr, ref = torch.rand(2, 3, 10, 14), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        sr, mu, logvar = decode_reference(model, lr, ref)
    assert sr.shape == (2, 3, 10 * scale, 14 * scale)
    assert mu.shape == logvar.shape == (2, 8)
    with torch.no_grad():
        again, _, _ = decode_reference(model, lr, ref)
        other, _, _ = decode_reference(model, lr, ref.flip(-1))
    assert torch.equal(sr, again)  # deterministic
    assert not torch.allclose(sr, other)  # and the reference matters


def test_release_checkpoints_fit_in_16_mib(tmp_path):
    for scale in (2, 4, 8):
        path = tmp_path / f"x{scale}.safetensors"
        save_model(RefVAE(RefVAEConfig(scale=scale)), path)
        assert path.stat().st_size < 16 * 2 ** 20


def test_untrained_model_is_bicubic():
    torch.manual_seed(0)
    model = build_model(tiny_config(4)).eval()
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        sr, _, _ = decode_reference(model, lr, torch.rand(1, 3, 32, 32))
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.allclose(sr, bicubic)


def test_condition_map_is_periodic_and_anchored():
    cell = torch.arange(16.0).view(1, 1, 4, 4)
    full = tile_periodic(cell, 10, 9)
    assert torch.equal(full[..., :4, :4], cell) and torch.equal(full[..., 4:8, 4:8], cell)
    # A window cut at (3, 5) equals the same window of the full plane: tiles see the image's condition.
    assert torch.equal(tile_periodic(cell, 6, 4, 3, 5), full[..., 3:9, 5:9])


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(4)
    save_model(model, tmp_path / "m.safetensors", step=7)
    loaded = load_weights(tmp_path / "m.safetensors", scale=4).model
    assert loaded.config == model.config
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(k.startswith("vgg.") for k in loaded.trainable_state_dict())
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_other_scale_is_refused(checkpoint):
    assert read_config(checkpoint).scale == 2
    with pytest.raises(RefsrError, match="x2 checkpoint, but --scale 8"):
        load_weights(checkpoint, scale=8).model


def test_other_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model(2)
    config = tiny_config(2).to_json().replace('"channels": 8', '"channels": 16')
    save_file(model.trainable_state_dict(), tmp_path / "wide.safetensors",
              metadata={"format": "refsr-refvae", "config": config})
    with pytest.raises(RefsrError, match="do not match its config"):
        load_weights(tmp_path / "wide.safetensors", scale=2).model
    save_file(model.trainable_state_dict(), tmp_path / "arch.safetensors",
              metadata={"format": "refsr-refvae", "config": config.replace('"trunk"', '"unet"')})
    with pytest.raises(RefsrError, match="unknown architecture"):
        load_weights(tmp_path / "arch.safetensors", scale=2).model


def test_config_from_another_version_is_refused():
    config = tiny_config(2).to_json()
    with pytest.raises(ValueError, match="missing"):
        RefVAEConfig.from_json(config.replace(', "z_modulation": true', ""))
    with pytest.raises(ValueError, match="unknown config keys"):
        RefVAEConfig.from_json(config.replace("{", '{"attention": 4, ', 1))
    with pytest.raises(ValueError, match="not a valid int"):
        RefVAEConfig.from_json(config.replace('"channels": 8', '"channels": "8"'))


def test_pickle_and_foreign_files_are_refused(tmp_path):
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(RefsrError, match="not a readable safetensors"):
        load_weights(pickled).model
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(RefsrError, match="not a refsr checkpoint"):
        load_weights(tmp_path / "foreign.safetensors").model


@pytest.mark.parametrize("arch, release", [("lean", "83cac99"), ("paper", "bench/paper_graph.py")])
def test_checkpoints_of_retired_architectures_say_what_reads_them(arch, release, tmp_path):
    from safetensors.torch import save_file
    config = tiny_config(2).to_json().replace('"trunk"', f'"{arch}"')
    save_file({"x": torch.zeros(2)}, tmp_path / "old.safetensors", metadata={"format": "refsr-refvae", "config": config})
    with pytest.raises(RefsrError, match=release) as error:
        load_weights(tmp_path / "old.safetensors").model
    assert "\n" not in str(error.value)


def test_the_published_graph_of_the_speed_bench_runs_through_the_upscaler():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from paper_graph import PaperConfig, PaperRefVAE
    from refsr_cli.engine import Upscaler
    import numpy as np
    torch.manual_seed(0)
    model = PaperRefVAE(PaperConfig(scale=4, channels=16, up_channels=(8, 8), stages=2, head_channels=8,
                                    head_grid=4, cond_grid=4, z_dim=8, ref_size=32))
    up = Upscaler(model, "cpu", tile=16)  # the smallest tile --tile takes: this image in four tiles
    lr = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    out, = up.upscale(lr, [up.reference_z(np.random.default_rng(1).random((40, 40, 3)))])
    assert out.shape == (80, 96, 3)


def test_matrix_resampling_equals_torch_interpolate():
    import torch.nn.functional as F
    from refsr_cli.model import downscale, upsample
    x = torch.rand(2, 3, 13, 21)
    for s in (2, 4, 8):
        assert torch.allclose(upsample(x, s), F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False),
                              atol=1e-5)
        big = torch.rand(2, 3, 13 * s, 21 * s)
        expected = F.interpolate(big, scale_factor=1 / s, mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(downscale(big, s), expected, atol=1e-5)
    with torch.inference_mode():  # cached under inference mode, the matrices must still serve training
        upsample(torch.rand(1, 3, 5, 6), 2)
    y = torch.rand(1, 3, 5, 6, requires_grad=True)
    upsample(y, 2).sum().backward()
    assert y.grad is not None
