import numpy as np
import pytest
import torch
from PIL import Image

from refsr_cli.checkpoint import build_model, save_model
from refsr_cli.model import RefVAEConfig

torch.set_num_threads(2)


def tiny_config(scale=2, **overrides):
    """A network small enough for the tests to run in seconds, with every part of the real one."""
    fields = dict(scale=scale, channels=8, lr_blocks=1, fuse_blocks=1, up_channels=(8, 8, 8), z_dim=8,
                  head_channels=8, ref_size=32, cond_grid=2, cond_period=4)
    fields.update(overrides)
    return RefVAEConfig(**fields)


def tiny_model(scale=2, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(scale, **overrides))
    # The output layer starts at zero (the model starts as bicubic); give it weights so z and refs matter.
    torch.nn.init.normal_(model.to_rgb.weight, std=0.1)
    torch.nn.init.normal_(model.ref_to_posterior.weight, std=0.5)
    if hasattr(model, "z_to_style"):
        torch.nn.init.normal_(model.z_to_style.weight, std=0.05)
    for strength in getattr(model, "noise_strength", []):  # and the texture noise, so that tiling tests see it
        torch.nn.init.normal_(strength, std=0.5)
    return model.eval()


def one_error_line(result, *fragments):
    """The command said one line, `refsr: error: ...`, holding each of `fragments`, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("refsr: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


def decode_reference(model, lr, ref, noise_seed=0):
    """The model's output for each LR image with the mean z of its reference, as `upscale --ref` decodes it
    (untiled, without back-projection)."""
    from refsr_cli.model import noise_tables
    mu, logvar = model.encode_reference(ref)
    noise = noise_tables([noise_seed] * len(lr), lr.shape[-2:], model.config.stages, lr.device)
    return model.decode(lr, model.encode_lr(lr), model.condition_cell(mu, noise)), mu, logvar


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny x2 checkpoint file."""
    path = tmp_path / "tiny-x2.safetensors"
    save_model(tiny_model(2), path)
    return path


def smooth_image(height, width, seed=0):
    """A smooth random RGB image (uint8 HxWx3): noise upsampled, so downscaling it means something."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(height // 4, 2), max(width // 4, 2), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def write_png(path, height=12, width=16, seed=0, mode="RGB"):
    Image.fromarray(smooth_image(height, width, seed)).convert(mode).save(path)
    return path
