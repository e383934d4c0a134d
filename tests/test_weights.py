"""The shipped release weights: they load by default, and they beat bicubic where a user would look."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refsr_cli.checkpoint import load_backbone, load_weights
from refsr_cli.engine import Upscaler
from refsr_cli.metrics import LPIPSAlex, bicubic_resize, modcrop, psnr_y, to_float

HELD_IN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train_hr" / "bsds-100075.jpg"


@pytest.mark.parametrize("scale", [8, 4, 2])
def test_shipped_weights_load_by_default(scale):
    model = load_weights(None, scale).model
    assert model.config.scale == scale


@pytest.mark.skipif(not HELD_IN.exists(), reason="needs ../shared/data (the training data beside the checkout)")
@pytest.mark.parametrize("scale", [8, 4, 2])
def test_shipped_weights_beat_bicubic_on_a_held_in_image(scale):
    with Image.open(HELD_IN) as im:
        hr = modcrop(im.convert("RGB").crop((96, 32, 96 + 256, 32 + 256)), scale)
    lr = bicubic_resize(hr, (hr.width // scale, hr.height // scale))
    up = Upscaler(load_weights(None, scale).model, "cpu")
    # The fidelity output (T = 0) and one prior sample (T = 1).
    outputs = up.upscale(np.asarray(lr, dtype=np.float32) / 255, [None, up.prior_z(0, temperature=1.0)])
    bicubic, hr = to_float(bicubic_resize(lr, hr.size)), to_float(hr)
    lpips = LPIPSAlex()
    load_backbone(lpips, "lpips_alex")
    as_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    for sr in outputs:
        sr = sr.astype(np.float64) / 255
        assert psnr_y(sr, hr, scale) > psnr_y(bicubic, hr, scale)
        with torch.no_grad():
            assert lpips(as_tensor(sr), as_tensor(hr)).item() < lpips(as_tensor(bicubic), as_tensor(hr)).item()
