import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_png
from refsr_cli.checkpoint import load_weights
from refsr_cli.errors import RefsrError
from refsr_cli.losses import away_from_border, detail_on_flats, feature_stats_loss, flat_mask, masked_stats
from refsr_cli.model import VGG16Features
from refsr_cli.options import TrainOptions
from refsr_cli.train import train


@pytest.fixture
def data(tmp_path):
    photos, refs = tmp_path / "photos", tmp_path / "refs"
    photos.mkdir()
    refs.mkdir()
    for i in range(4):
        # Blocky images: sharp edges are what bicubic gets wrong and a few steps can learn.
        blocks = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((64, 48), Image.NEAREST).save(photos / f"p{i}.png")
        write_png(refs / f"r{i}.png", 40, 40, seed=10 + i)
    return photos, refs


def options(data, out, **kw):
    """A texture-stage run of a tiny model: these tests are about the loop, not the losses' values."""
    photos, refs = data
    fields = dict(data=[photos], refs=[refs], out=out, scale=2, steps=6, batch=4, lr_patch=16, save_every=3,
                  log_every=1, config=tiny_config(2), learning_rate=1e-3, imle_samples=3, perceptual_crop=32,
                  pool_size=6, crop_uses=2)
    fields.update(kw)
    return TrainOptions(**fields)


def trunk_options(data, out, **kw):
    # A trunk a little wider than tiny_config's, which learns too slowly to show in a few steps.
    fields = dict(stage="trunk", refs=None, scales=(2, 4), steps=60, batch=4, lr_patch=8, save_every=20, learning_rate=5e-3,
                  config=tiny_config(2, channels=16, lr_blocks=2, up_channels=(16, 16, 16)))
    return options(data, out, **(fields | kw))


def interrupt_at(stop):
    def progress(step, *a):
        if step == stop:
            raise KeyboardInterrupt
    return progress


def same_weights(a, b, atol=1e-6):
    a, b = load_weights(a).model.trainable_state_dict(), load_weights(b).model.trainable_state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), key


def test_texture_stage_resumes_exactly_with_its_crop_pool(data, tmp_path):
    """The pool of crops is a function of the step: a resumed run rebuilds it and sees the same batches."""
    straight = train(options(data, tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train(options(data, tmp_path / "cut"), progress=interrupt_at(4))
    steps = []
    resumed = train(options(data, tmp_path / "cut", resume=True), progress=lambda s, *a: steps.append(s))
    assert steps == [4, 5, 6]  # continued from the step-3 checkpoint, not from zero
    same_weights(straight, resumed)


def test_texture_stage_keeps_the_trunk_frozen_and_makes_samples_differ(data, tmp_path):
    from refsr_cli.engine import Upscaler
    train(trunk_options(data, tmp_path / "trunk", steps=4))
    trunk_ckpt = tmp_path / "trunk" / "x2.safetensors"
    texture = train(options(data, tmp_path / "texture", init=[trunk_ckpt], steps=8, modulation_lr_scale=10))
    before = load_weights(trunk_ckpt).model.trainable_state_dict()
    after = load_weights(texture).model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("trunk."))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("trunk."))
    up = Upscaler(load_weights(texture).model, "cpu")
    lr = np.random.default_rng(0).random((10, 12, 3)).astype(np.float32)
    fidelity, a, b = up.upscale(lr, [None, up.prior_z(0, 1.0), up.prior_z(1, 1.0)])
    assert np.abs(a.astype(int) - fidelity).mean() > 0 and np.abs(a.astype(int) - b).mean() > 0


def test_imle_trains_the_sample_nearest_the_hr_crop(data, tmp_path):
    """Of the m latents decoded for a crop, the one chosen is the one whose output is nearest the HR crop under
    the feature distance, recomputed here one latent at a time."""
    import random
    from refsr_cli.losses import feature_distance
    from refsr_cli.stages import TextureStage
    stage = TextureStage(options(data, tmp_path / "run"), torch.device("cpu"), 0, None)
    model = stage.model
    for strength in model.noise_strength:  # make the latents matter in this untrained branch
        torch.nn.init.normal_(strength, std=0.5)
    torch.nn.init.normal_(model.to_rgb.weight, std=0.1)
    torch.nn.init.normal_(model.z_to_style.weight, std=0.1)
    stage.pool.advance(0, 2)
    _, hr, lr, features, fidelity = stage.pool.draw(2, random.Random(0))
    m = 5
    z = torch.randn(2 * m, model.config.z_dim)
    grain = [torch.randn(2 * m, 1, 16 * 2, 16 * 2)]
    window = stage.window(hr.shape[-1], torch.Generator().manual_seed(0))
    with torch.no_grad():
        f_mu, f_sigma = model.lr_to_modulation(features).chunk(2, dim=1)
        target = model.vgg(window(hr), all_layers=True)
        chosen = stage.nearest(m, lr, fidelity, f_mu, f_sigma, z, grain, window, target)
        for crop in range(2):
            one = slice(crop, crop + 1)
            distances = [feature_distance(model.vgg, window(stage.decode(
                lr[one], fidelity[one], f_mu[one], f_sigma[one], z[j:j + 1], [grain[0][j:j + 1]])),
                [t[one] for t in target]).item() for j in range(crop * m, crop * m + m)]
            assert len(set(distances)) == m  # the latents make different outputs
            assert chosen[crop] == crop * m + int(np.argmin(distances))


def test_resume_without_a_run_is_refused(data, tmp_path):
    with pytest.raises(RefsrError, match="no checkpoint to resume"):
        train(options(data, tmp_path / "empty", resume=True))


def test_a_run_is_not_overwritten_nor_resumed_with_another_recipe(data, tmp_path):
    train(options(data, tmp_path / "run", steps=3))
    with pytest.raises(RefsrError, match="holds a run already"):
        train(options(data, tmp_path / "run", steps=3))
    with pytest.raises(RefsrError, match=r"other options \(--batch 4, not 2\); resume with the same options"):
        train(options(data, tmp_path / "run", steps=6, batch=2, resume=True))
    # A flag only one of the two recipes has is named too, as "none" on the side that lacks it.
    with pytest.raises(RefsrError, match=r'--scale 2, not none; --scales none, not \[2, 4\];.*--stage "texture", '
                                         r'not "trunk"'):
        train(trunk_options(data, tmp_path / "run", steps=6, batch=4, resume=True))


def test_train_cli(data, tmp_path):
    from click.testing import CliRunner
    from refsr_cli.cli import main
    photos, _ = data
    result = CliRunner().invoke(main, ["train", "--data", str(photos), "--out", str(tmp_path / "run"), "--scale", "2",
                                       "--steps", "2", "--batch", "2", "--lr-patch", "16", "--imle-samples", "2",
                                       "--perceptual-crop", "32", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # Without --init, the texture stage continues the shipped weights of --scale (with today's noise gate).
    from dataclasses import replace
    model = load_weights(tmp_path / "run" / "last.safetensors", scale=2).model
    assert model.config == replace(load_weights(None, 2).model.config, noise_gate=True)


def test_train_out_under_a_file_is_one_line(data, tmp_path):
    from click.testing import CliRunner
    from refsr_cli.cli import main
    photos, _ = data
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["train", "--data", str(photos), "--out", str(tmp_path / "file" / "run"),
                                       "--steps", "1", "-q", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "refsr: error: --out" in result.output


def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from safetensors import safe_open
    photos, _ = data
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "refsr_cli", "train", "--stage", "trunk", "--data", str(photos),
               "--scales", "2,4", "--out", str(run_dir), "--batch", "1", "--lr-patch", "8", "--save-every", "2", "--log-every", "1",
               "--device", "cpu", "-q"]
    proc = subprocess.Popen(command + ["--steps", "100000"], stderr=subprocess.PIPE)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with safe_open(str(run_dir / "last.state.safetensors"), "pt") as f:  # what --resume continues from
        saved = int(f.metadata()["step"])
    logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert saved >= 18 and saved >= logged - 2  # lost at most the steps since the last checkpoint
    result = subprocess.run(command + ["--steps", str(saved + 2), "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with safe_open(str(run_dir / "x4.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) == saved + 2
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]


def test_every_term_is_logged_and_the_discriminator_resumes(data, tmp_path):
    full = dict(adv_weight=0.1, ref_share=0.5, ref_mix=0.5, flat_weight=1.0, steps=4, save_every=2)
    straight = train(options(data, tmp_path / "straight", **full))
    row = json.loads((tmp_path / "straight" / "log.jsonl").read_text().splitlines()[-1])
    for term in ("imle", "l1", "lr_cons", "content", "style", "kl", "adv", "disc", "flat"):
        assert term in row and np.isfinite(row[term]), term
    # The loss the generator descends is the weighted sum of its terms (the critic's own loss is not among them).
    opt = options(data, tmp_path / "straight", **full)
    weights = {"imle": opt.imle_weight, "l1": opt.l1_weight, "lr_cons": opt.lr_consistency_weight,
               "content": opt.content_weight, "style": opt.style_weight, "kl": opt.kl_weight,
               "adv": opt.adv_weight, "flat": opt.flat_weight}
    assert row["loss"] == pytest.approx(sum(w * row[k] for k, w in weights.items()), rel=1e-5)
    with pytest.raises(KeyboardInterrupt):
        train(options(data, tmp_path / "cut", **full), progress=interrupt_at(3))
    resumed = train(options(data, tmp_path / "cut", resume=True, **full))
    same_weights(straight, resumed, atol=1e-5)  # the discriminator came back too: else its gradients would differ


def test_validation_during_training_is_logged(data, tmp_path):
    photos, _ = data
    train(options(data, tmp_path / "run", steps=2, val=photos, val_every=2, val_samples=2))
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"val_psnr", "val_ssim", "val_lpips", "val_lr_psnr", "val_diversity"} <= set(rows[-1])
    assert not any(k.startswith("val_") for k in rows[0])  # step 1: no validation
    last = rows[-1]
    assert 10 < last["val_psnr"] < 60 and 0 < last["val_ssim"] <= 1 and 0 <= last["val_lpips"] < 1
    assert last["val_lr_psnr"] > 40  # back-projection holds for the samples too
    assert last["val_diversity"] >= 0


def test_train_cli_defaults_are_the_training_defaults():
    """The CLI reads its defaults from TrainOptions: one place for them."""
    from refsr_cli.cli import main, parse_scales
    command = main.commands["train"]
    defaults = TrainOptions(data=[])
    for param in command.params:
        if hasattr(defaults, param.name) and param.name not in ("data", "refs", "device", "resume", "init"):
            value = {"scale": int, "scales": parse_scales}.get(param.name, lambda v: v)(param.default)
            assert value == getattr(defaults, param.name), param.name


def test_torchrun_two_cpu_processes_keep_identical_parameters(data, tmp_path):
    """Gradients averaged over gloo: both ranks end with the same weights, which moved; rank 0 alone logs."""
    import subprocess
    import sys
    from pathlib import Path
    from safetensors.torch import load_file
    from refsr_cli.checkpoint import build_model
    photos, _ = data
    worker = Path(__file__).parent / "ddp_worker.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(worker), str(photos), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    torch.manual_seed(0)  # what a fresh run with --seed 0 starts from
    initial = build_model(tiny_config(2)).trainable_state_dict()
    moved = 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
        moved += not torch.allclose(a[key], initial[key])
    assert moved > 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert load_weights(tmp_path / "run" / "last.safetensors", scale=2).model is not None


@pytest.fixture
def one_photo(tmp_path):
    """One 32x32 image of 8-pixel blocks: random crops of many images are too hard to learn in a test's steps."""
    folder = tmp_path / "one"
    folder.mkdir()
    blocks = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((32, 32), Image.NEAREST).save(folder / "blocks.png")
    return folder, None


def test_trunk_stage_trains_every_scale_and_writes_a_checkpoint_per_scale(one_photo, tmp_path):
    import random
    from refsr_cli.engine import Upscaler
    from refsr_cli.train_data import load_training_images, pixel_batch
    photos, _ = one_photo
    opt = trunk_options(one_photo, tmp_path / "trunk", val=photos, steps=100, val_every=100, save_every=50)
    images = load_training_images(opt.data, 32)
    last = train(opt)
    assert last == tmp_path / "trunk" / "x4.safetensors"
    rows = [json.loads(r) for r in (tmp_path / "trunk" / "log.jsonl").read_text().splitlines()]
    assert [r["scale"] for r in rows[:4]] == [2, 4, 2, 4]  # the scales take turns (log_every=1: steps 1..4)
    for scale in (2, 4):
        model = load_weights(tmp_path / "trunk" / f"x{scale}.safetensors", scale).model
        assert list(model.trunk.tails) == [f"x{scale}"]
        hr, lr = pixel_batch(images, 4, opt.lr_patch, scale, random.Random(1))
        with torch.no_grad():
            bicubic = torch.nn.functional.l1_loss(torch.nn.functional.interpolate(
                lr, scale_factor=scale, mode="bicubic", align_corners=False), hr).item()
            trained = torch.nn.functional.l1_loss(model.trunk(lr, scale), hr).item()
        assert trained < 0.97 * bicubic, (scale, bicubic, trained)
        # Until the texture stage trains it, every z gives the trunk's output.
        up = Upscaler(model, "cpu")
        lr_image = lr[0].permute(1, 2, 0).numpy()
        fidelity, sample = up.upscale(lr_image, [None, up.prior_z(0, 1.0)])
        assert np.array_equal(fidelity, sample)
    assert {"val_psnr_x2", "val_bicubic_x2", "val_psnr_x4", "val_bicubic_x4"} <= set(rows[-1])


def test_trunk_stage_resumes_exactly(data, tmp_path):
    straight = train(trunk_options(data, tmp_path / "straight", steps=12, save_every=4))
    with pytest.raises(KeyboardInterrupt):
        train(trunk_options(data, tmp_path / "cut", steps=12, save_every=4), progress=interrupt_at(6))
    resumed = train(trunk_options(data, tmp_path / "cut", steps=12, save_every=4, resume=True))
    same_weights(straight, resumed)
    with pytest.raises(RefsrError, match="resume with the same"):
        train(trunk_options(data, tmp_path / "cut", steps=12, save_every=4, resume=True, scales=(2, 8)))


def test_texture_stage_on_an_older_trunk_checkpoint_starts_todays_texture_branch(data, tmp_path):
    """Release 2's trunk checkpoints predate the texture branch's noise and bilinear stages: their configs lack the
    keys (read as texture_noise false, texture_upsample "shuffle"). The texture stage takes their trunk and builds
    the branch of the current design."""
    from dataclasses import replace
    from safetensors.torch import load_file, save_file
    from refsr_cli.checkpoint import build_model, read_metadata, save_model
    from refsr_cli.stages import texture_model
    train(trunk_options(data, tmp_path / "trunk", steps=2))
    trunk = load_weights(tmp_path / "trunk" / "x2.safetensors").model
    old_model = build_model(replace(trunk.config, texture_noise=False, texture_upsample="shuffle"))
    old_model.trunk.load_state_dict(trunk.trunk.state_dict())
    old = tmp_path / "old-x2.safetensors"
    save_model(old_model, old, stage="trunk")
    config = json.loads(old_model.config.to_json())
    del config["texture_noise"], config["texture_upsample"]  # as written before the keys existed
    save_file(load_file(str(old)), str(old), metadata=read_metadata(old) | {"config": json.dumps(config)})
    loaded = load_weights(old).model  # loads, as what it was
    assert loaded.config.texture_noise is False and loaded.config.texture_upsample == "shuffle"
    model = texture_model(options(data, tmp_path / "texture", init=[old]), None)
    assert model.config.texture_noise and model.config.texture_upsample == "bilinear"
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk.trunk.state_dict().items())


def test_trunk_stage_continues_from_one_checkpoint_per_scale(data, tmp_path):
    from refsr_cli.model import FidelityTrunk
    from refsr_cli.stages import init_trunk
    opt = trunk_options(data, tmp_path / "a", steps=4)
    train(opt)
    files = [tmp_path / "a" / f"x{s}.safetensors" for s in (2, 4)]
    config = opt.config
    trunk = FidelityTrunk(config.channels, config.lr_blocks, config.up_channels, (2, 4, 8))
    fresh_x8 = {k: v.clone() for k, v in trunk.tails["x8"].state_dict().items()}
    init_trunk(trunk, config, files)
    for path in files:
        saved = load_weights(path).model.trunk.state_dict()
        assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in saved.items())
    assert all(torch.equal(v, trunk.tails["x8"].state_dict()[k]) for k, v in fresh_x8.items())  # no x8 file
    train(trunk_options(data, tmp_path / "b", steps=4, seed=1))
    with pytest.raises(RefsrError, match="differs"):
        init_trunk(trunk, config, [files[0], tmp_path / "b" / "x4.safetensors"])
    with pytest.raises(RefsrError, match="a second x2 checkpoint"):  # one tail, two files: neither may win silently
        init_trunk(trunk, config, [files[0], files[0]])


def test_modulation_parameters_learn_at_their_own_rate(data, tmp_path):
    """--modulation-lr-scale moves the noise strengths and z modulation (and only them) off the base rate, all the
    way down the cosine schedule."""
    from refsr_cli.stages import TextureStage
    from refsr_cli.train import set_learning_rate
    opt = options(data, tmp_path / "run", learning_rate=1e-3, modulation_lr_scale=10.0, steps=10)
    stage = TextureStage(opt, torch.device("cpu"), 0, None)
    optimizer = torch.optim.Adam(stage.parameter_groups(), lr=opt.learning_rate)
    names = {id(p): n for n, p in stage.model.named_parameters()}
    base, modulation = optimizer.param_groups
    assert {names[id(p)].split(".")[0] for p in modulation["params"]} == {"noise_strength", "noise_gate", "z_to_style"}
    assert not any(names[id(p)].startswith(("noise_strength", "noise_gate", "z_to_style", "trunk.", "vgg."))
                   for p in base["params"])
    for step in (0, 5):
        set_learning_rate([optimizer], opt, step)
        assert modulation["lr"] == pytest.approx(10 * base["lr"])
    assert base["lr"] < opt.learning_rate


def test_a_checkpoint_without_the_noise_gate_continues_with_one_computing_the_same():
    from dataclasses import replace
    from conftest import tiny_model
    from refsr_cli.checkpoint import Weights
    from refsr_cli.engine import Upscaler
    from refsr_cli.options import TrainOptions
    from refsr_cli.stages import migrated
    old = tiny_model(2, noise_gate=False)
    extended = migrated(Weights(old, None, {"stage": "texture"}, None), TrainOptions(data=[], scale=2))
    assert extended.config == replace(old.config, noise_gate=True)
    lr = np.random.default_rng(0).random((10, 12, 3)).astype(np.float32)
    a, b = Upscaler(old, "cpu"), Upscaler(extended.eval(), "cpu")
    assert np.array_equal(a.upscale(lr, [a.prior_z(3)])[0], b.upscale(lr, [b.prior_z(3)])[0])
    # the gate then scales the grain pixel by pixel
    torch.nn.init.normal_(extended.noise_gate[0].weight, std=1.0)
    assert not np.array_equal(a.upscale(lr, [a.prior_z(3)])[0], b.upscale(lr, [b.prior_z(3)])[0])


def test_the_discriminator_tells_every_real_window_from_every_fake_one():
    """More fakes than reals (the reference outputs are fakes too): the split follows the counts, not halves."""
    from refsr_cli.losses import discriminator_loss
    seen = []

    def disc(x):
        seen.append(x)
        return x.mean((1, 2, 3), keepdim=True)  # one logit an image: its mean

    real, fake = torch.ones(2, 3, 8, 8), torch.zeros(4, 3, 8, 8)
    loss = discriminator_loss(disc, real, fake)
    expected = torch.nn.functional.softplus(-torch.ones(1)) + torch.nn.functional.softplus(torch.zeros(1))
    assert torch.allclose(loss, expected) and len(seen[0]) == 6


def test_a_run_never_writes_over_its_init(data, tmp_path):
    run = tmp_path / "run"
    train(options(data, run, steps=1, save_every=1))
    (run / "last.state.safetensors").unlink()  # a finished run's folder, its state gone
    with pytest.raises(RefsrError, match="would write over it"):
        train(options(data, run, steps=1, init=[run / "last.safetensors"]))


def test_resume_drops_a_log_row_cut_short(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(options(data, run), progress=interrupt_at(4))
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 4, "lo')  # killed in the middle of a row
    train(options(data, run, resume=True))
    steps = [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_detail_on_flats_counts_grain_where_the_photo_is_flat_and_nowhere_else():
    gen = torch.Generator().manual_seed(0)
    hr = torch.full((1, 3, 64, 64), 0.5)
    hr[..., 32:] = torch.rand(1, 3, 64, 32, generator=gen)  # flat left half, textured right half
    mask = flat_mask(hr)
    assert mask[..., :24].min() == 1 and mask[..., 36:].max() == 0
    assert detail_on_flats(hr, mask) < 1e-6
    other_texture = hr.clone()
    other_texture[..., 32:] = torch.rand(1, 3, 64, 32, generator=gen)
    assert detail_on_flats(other_texture, mask) < 1e-6  # texture is free where the photo has texture
    grainy = hr.clone()
    grainy[..., :32] += 0.05 * torch.randn(1, 3, 64, 32, generator=gen)
    assert detail_on_flats(grainy, mask) > 0.02


def test_masked_stats_of_a_full_mask_are_the_plain_channel_stats():
    features = torch.rand(2, 5, 9, 7, generator=torch.Generator().manual_seed(0))
    mean, std = masked_stats(features, torch.ones(2, 1, 18, 14))
    assert torch.allclose(mean, features.mean((2, 3)), atol=1e-6)
    assert torch.allclose(std, features.std((2, 3), correction=0), atol=1e-4)


def test_a_textured_style_term_compares_texture_with_texture_and_leaves_flat_crops_out():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    vgg = VGG16Features()  # random weights: equal textures still give equal statistics
    texture = torch.rand(1, 3, 64, 64, generator=gen)
    ref = torch.rand(1, 3, 64, 64, generator=gen)  # the same kind of texture, all over
    out = torch.full((1, 3, 64, 64), 0.5)
    out[..., 32:] = texture[..., 32:]  # a crop half flat, half that texture
    textured, ref_textured = 1 - flat_mask(out), 1 - flat_mask(ref)
    everywhere = feature_stats_loss(vgg, out, ref)
    masked = feature_stats_loss(vgg, out, ref, textured, ref_textured)
    assert masked < everywhere / 3  # the flat half no longer asks for the reference's texture
    flat = torch.full((1, 3, 64, 64), 0.5, requires_grad=True)
    loss = feature_stats_loss(vgg, flat, ref, 1 - flat_mask(flat.detach()), ref_textured)
    loss.backward()
    assert loss == 0 and torch.isfinite(flat.grad).all()  # nothing to take a look from, and no NaN


def test_training_with_the_textured_style_term(data, tmp_path):
    style = {}
    for where in ("textured", "everywhere"):
        train(options(data, tmp_path / where, steps=1, ref_share=1.0, style_where=where))
        style[where] = json.loads((tmp_path / where / "log.jsonl").read_text().splitlines()[-1])["style"]
    assert np.isfinite(style["textured"]) and style["textured"] > 0
    assert style["textured"] != style["everywhere"]  # the same step and crops, statistics of other pixels


def test_away_from_border_clears_the_margin_and_keeps_the_inside():
    mask = away_from_border(torch.ones(2, 1, 20, 24), 4)
    assert mask[..., 4:16, 4:20].min() == 1
    assert mask.sum() == 2 * 12 * 16  # everything else, the 4-pixel frame, is 0


@pytest.mark.parametrize("stage, weights", [
    ("texture", dict(l1_weight=0, lr_consistency_weight=0, imle_weight=0, content_weight=0, style_weight=0,
                     kl_weight=0)),
    # The reference outputs' terms count for nothing when no share of the batch is decoded from a reference.
    ("texture", dict(l1_weight=0, lr_consistency_weight=0, imle_weight=0, ref_share=0, refs=None)),
    # Nor do the texture stage's terms in the trunk stage, which computes the pixel terms alone.
    ("trunk", dict(l1_weight=0, lr_consistency_weight=0))])
def test_a_run_that_would_learn_nothing_is_refused(data, tmp_path, stage, weights):
    make = options if stage == "texture" else trunk_options
    with pytest.raises(RefsrError, match=f"every loss weight of the {stage} stage is 0 .*--lr-consistency-weight"):
        train(make(data, tmp_path / "run", **weights))
    assert not (tmp_path / "run").exists()


def test_the_trunk_stage_refuses_references(data, tmp_path):
    with pytest.raises(RefsrError, match="--refs: the trunk stage has no reference outputs"):
        train(trunk_options(data, tmp_path / "run", refs=[data[1]]))
    for share in (dict(ref_share=0), dict(ref_mix=0)):  # nor does a texture run that would take none from them
        with pytest.raises(RefsrError, match="--refs: with --ref-share .* no reference is taken from them"):
            train(options(data, tmp_path / "run", **share))
