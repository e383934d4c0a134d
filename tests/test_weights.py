"""The shipped release weights: they load by default, and on a small CC-licensed set that ships with the tests
(tests/data/hr, cut by scripts/make_test_images.py from photos held out of training) they beat bicubic by the
margins their model card states (weights/README.md, measured by `refsr eval tests/data/hr --scale S --samples 2`)."""
from pathlib import Path

import pytest

from refsr_cli.checkpoint import load_weights, weights_dir
from refsr_cli.evaluate import plan_evaluation
from refsr_cli.options import EvalOptions

HR = Path(__file__).resolve().parent / "data" / "hr"
# PSNR-Y of the faithful output (upscale without a reference) over bicubic's, in dB, as the card states it; samples
# (texture by analogy, the default) keep at least SAMPLE_MARGIN of it.
MARGIN = {2: 3.0, 4: 1.8, 8: 1.6}
SAMPLE_MARGIN = 0.5


@pytest.mark.parametrize("scale", [8, 4, 2])
def test_shipped_weights_load_by_default_with_a_trained_texture_branch(scale):
    weights = load_weights(None, scale)
    assert weights.model.config.scale == scale
    assert weights.path == weights_dir() / f"refsr-x{scale}.safetensors"
    assert weights.texture_trained and weights.metadata["format"] == "refsr-refvae"


@pytest.mark.parametrize("scale", [8, 4, 2])
def test_shipped_weights_beat_bicubic_by_their_cards_margin(scale):
    result = plan_evaluation(EvalOptions(hr_dir=HR, scale=scale, samples=2, device="cpu")).run()
    assert not result["failed"] and len({r["image"] for r in result["rows"]}) == 5
    bicubic, faithful, samples = (result["means"][m] for m in ("bicubic", "refsr", "samples"))
    assert faithful["psnr"] >= bicubic["psnr"] + MARGIN[scale]
    assert samples["psnr"] >= bicubic["psnr"] + SAMPLE_MARGIN
    for output in (faithful, samples):  # and closer to the photo by both perceptual distances
        assert output["lpips"] < bicubic["lpips"] and output["lpips_vgg"] < bicubic["lpips_vgg"]
    assert samples["diversity"] > 1  # the samples differ
