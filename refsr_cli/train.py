"""`refsr train`: one loop over a stage, training the very modules that inference loads.

    trunk    the FidelityTrunk of every --scales at once (one shared body, a tail per scale; the scales take turns
             batch by batch), under pixel L1 and LR-consistency L1. Writes x{scale}.safetensors for each scale.
    texture  the texture branch of one --scale on a frozen trunk. Prior samples are trained by implicit maximum
             likelihood (IMLE; Li and Malik 2018, Peng and Li's HyperRIM and CHIMLE for SR): each crop is decoded
             for --imle-samples latents without gradients, and only the one nearest the HR crop under a VGG16 feature
             distance is trained towards it, so that every HR has a sample near it and the samples spread over the
             plausible textures instead of agreeing on their mean. A share of each batch is also decoded from a
             reference's mean z (another crop of the same photo, or a gallery image) under a content and a style
             term, so that a reference sets the look. Writes last.safetensors.

A stage supplies what the loop needs: the module it trains, the losses of a step, the files it exports and its
validation. The run folder holds the exported checkpoints, `last.state.safetensors` (the trained module, its
optimizer and the step, for --resume) and `log.jsonl` (one row of losses per logged step). Under `torchrun
--nproc_per_node=N refsr train ...` every rank draws its own batch and the gradients are averaged over the ranks
before each step (gloo on the CPU, NCCL on CUDA); rank 0 alone writes files and validates.
"""
import json
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import (atomic_save, build_model, load_weights, not_finite, read_metadata, read_weights, save_model,
                         stored_config)
from .device import environment_int, launcher, pick_device
from .errors import RefsrError
from .files import atomic_path
from .losses import (PatchDiscriminator, away_from_border, detail_on_flats, discriminator_loss, feature_distance,
                     feature_stats_loss, flat_mask, generator_adversarial, kl_divergence, lr_consistency)
from .model import FidelityTrunk, RefVAEConfig
from .options import SAMPLE_TEMPERATURE, TrainOptions
from .train_data import CropPool, load_training_images, pixel_batch, resized, seeded, to_tensor


class TrunkStage:
    """The fidelity trunk of every scale in opt.scales, trained together."""

    name = "trunk"

    def __init__(self, opt: TrainOptions, device, rank: int, state: dict | None):
        self.opt, self.device, self.rank = opt, device, rank
        if state is not None:
            self.config = state["config"]
        else:
            self.config = opt.config or RefVAEConfig()
        c = self.config
        torch.manual_seed(opt.seed)
        self.module = FidelityTrunk(c.channels, c.lr_blocks, c.up_channels, opt.scales).to(device).train()
        if state is not None:
            self.module.load_state_dict(state["module"])
        else:
            init_trunk(self.module, c, opt.init or [])
        self.images = load_training_images(opt.data, opt.lr_patch * max(opt.scales))
        self.val_crops = None
        if opt.val is not None and rank == 0:
            self.val_crops = [np.asarray(c) for c in validation_crops(opt.val, 480, 8)]
        # One model per scale, filled with the trunk at each export: their texture branch stays at its initial
        # state (a zero output layer: every z gives the trunk's output until the texture stage trains it).
        torch.manual_seed(opt.seed)
        self.exports = {s: build_model(replace(c, scale=s)) for s in opt.scales} if rank == 0 else {}

    def parameter_groups(self):
        return [{"params": list(self.module.parameters()), "lr_scale": 1.0}]

    def trained_state(self) -> dict:
        return self.module.state_dict()

    def losses(self, step: int):
        scale = self.opt.scales[step % len(self.opt.scales)]
        rng = seeded("step", self.opt.seed, step, self.rank)
        hr, lr = (t.to(self.device) for t in pixel_batch(self.images, self.opt.batch, self.opt.lr_patch, scale, rng))
        sr = self.module(lr, scale).float()
        return {"scale": scale, "l1": F.l1_loss(sr, hr), "lr_cons": lr_consistency(sr, lr, scale)}, None

    def export(self, step: int) -> None:
        for scale, model in self.exports.items():
            tail = f"tails.x{scale}."
            model.trunk.load_state_dict({k: v for k, v in self.module.state_dict().items()
                                         if not k.startswith("tails.") or k.startswith(tail)})
            save_model(model, self.opt.out / f"x{scale}.safetensors", step=step, stage="trunk")

    @torch.no_grad()
    def validate(self) -> dict:
        """PSNR-Y of the trunk and of bicubic on centre crops of the validation images, at every scale."""
        from .metrics import psnr_y
        self.module.eval()
        measures = {}
        for scale in self.opt.scales:
            ours, bicubic = [], []
            for crop in self.val_crops:
                hr = Image.fromarray(crop)
                lr = hr.resize((hr.width // scale, hr.height // scale), Image.BICUBIC)
                sr = self.module(to_tensor([np.asarray(lr)]).to(self.device), scale).clamp(0, 1)
                sr = sr[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
                hr_f = crop.astype(np.float64) / 255
                ours.append(psnr_y(np.round(sr * 255) / 255, hr_f, scale))
                bicubic.append(psnr_y(np.asarray(lr.resize(hr.size, Image.BICUBIC), dtype=np.float64) / 255,
                                      hr_f, scale))
            measures[f"val_psnr_x{scale}"] = float(np.mean(ours))
            measures[f"val_bicubic_x{scale}"] = float(np.mean(bicubic))
        self.module.train()
        return measures


class TextureStage:
    """The texture branch of one scale on a frozen trunk: IMLE prior samples and reference outputs."""

    name = "texture"

    def __init__(self, opt: TrainOptions, device, rank: int, state: dict | None):
        self.opt, self.device, self.rank = opt, device, rank
        # Channels-last: oneDNN's (and cuDNN's) layout; the decoder and the VGG16 run twice as fast in it here.
        self.model = texture_model(opt, state).to(device, memory_format=torch.channels_last).train()
        self.config = self.model.config
        self.model.trunk.requires_grad_(False)
        self.model.trunk.eval()  # frozen: its outputs are computed once per crop
        self.module = self.model
        if opt.pool_size < opt.batch:
            raise RefsrError(f"--pool-size {opt.pool_size} is smaller than --batch {opt.batch}")
        check_pool_fits(opt, self.config, device)
        images = load_training_images(opt.data, opt.lr_patch * opt.scale)
        self.gallery = load_training_images(opt.refs, 1) if opt.refs else None
        trunk = self.model.trunk

        @torch.no_grad()
        def trunk_outputs(lr):
            features = trunk.features(lr)
            return features, trunk.reconstruct(lr, features, opt.scale)

        self.pool = CropPool(images, trunk_outputs, lr_patch=opt.lr_patch, scale=opt.scale, size=opt.pool_size,
                             uses=opt.crop_uses, seed=opt.seed, rank=rank, device=device)
        self.val_crops = None
        if opt.val is not None and rank == 0:
            self.val_crops = validation_crops(opt.val, 384, opt.scale)

    def parameter_groups(self):
        """Everything but the frozen VGG16 and trunk; the zero-initialised noise strengths, noise gates and z
        modulation in a group of their own, at modulation_lr_scale times the rate."""
        named = [(n, p) for n, p in self.model.named_parameters() if not n.startswith(("vgg.", "trunk."))]
        modulation = ("noise_strength.", "noise_gate.", "z_to_style.")
        groups = [{"params": [p for n, p in named if not n.startswith(modulation)], "lr_scale": 1.0}]
        if any(n.startswith(modulation) for n, _ in named):
            groups.append({"params": [p for n, p in named if n.startswith(modulation)],
                           "lr_scale": self.opt.modulation_lr_scale})
        return groups

    def trained_state(self) -> dict:
        return self.model.trainable_state_dict()

    def decode(self, lr, fidelity, f_mu, f_sigma, z, noise):
        return fidelity + self.model.texture_residual(lr, f_mu, f_sigma, self.model.condition_cell(z, noise), (0, 0))

    def losses(self, step: int):
        opt, model, vgg = self.opt, self.model, self.model.vgg
        rng = seeded("step", opt.seed, step, self.rank)
        gen = torch.Generator().manual_seed(rng.randrange(1 << 62))
        self.pool.advance(step, opt.batch)
        slots, hr, lr, features, fidelity = map(self.layout, self.pool.draw(opt.batch, rng))
        b, m = len(slots), opt.imle_samples
        f_mu, f_sigma = model.lr_to_modulation(features).chunk(2, dim=1)
        window = self.window(hr.shape[-1], gen)
        h, w = lr.shape[-2:]

        def noise(n):
            return [torch.randn(n, 1, h * 2 ** k, w * 2 ** k, generator=gen).to(self.device)
                    for k in range(1, self.config.stages + 1)] if self.config.texture_noise else None

        with torch.no_grad():
            target = vgg(window(hr), all_layers=True)  # the HR windows' features, for every distance below
        # IMLE: decode m latents per crop without gradients, train the nearest to the HR crop.
        z, grain = torch.randn(b * m, self.config.z_dim, generator=gen).to(self.device), noise(b * m)
        chosen = self.nearest(m, lr, fidelity, f_mu, f_sigma, z, grain, window, target)
        sr = self.decode(lr, fidelity, f_mu, f_sigma, z[chosen], None if grain is None else [g[chosen] for g in grain])
        losses = {"imle": feature_distance(vgg, window(sr), target).mean(), "l1": F.l1_loss(sr, hr),
                  "lr_cons": lr_consistency(sr, lr, opt.scale)}
        fakes, detailed = [sr], []
        if opt.flat_weight > 0:
            # One of the samples the IMLE did not pick, per crop: nothing else trains them.
            other = torch.arange(b) * m + (chosen % m + torch.randint(1, max(m, 2), (b,), generator=gen)) % m
            detailed.append(self.decode(lr, fidelity, f_mu, f_sigma, z[other],
                                        None if grain is None else [g[other] for g in grain]))

        # Where the HR crops are flat: for the flat term and the textured style term (computed once for both).
        flats = flat_mask(hr) if opt.flat_weight > 0 or opt.style_where == "textured" else None
        # Reference outputs: the mean z of a reference (what `upscale --ref` decodes), with fresh grain.
        k = round(b * opt.ref_share)
        if k:
            gallery = [self.gallery is not None and rng.random() < opt.ref_mix for _ in range(k)]
            refs = [resized(self.gallery[rng.randrange(len(self.gallery))], self.config.ref_size) if g
                    else self.pool.reference(slot, self.config.ref_size, rng) for slot, g in zip(slots[:k], gallery)]
            ref = self.layout(to_tensor(refs).to(self.device))
            mu, logvar = model.encode_reference(ref)
            sr_ref = self.decode(lr[:k], fidelity[:k], f_mu[:k], f_sigma[:k], mu, noise(k))
            losses["content"] = feature_distance(vgg, window(sr_ref), [t[:k] for t in target]).mean()
            style_masks = (None, None)
            if opt.style_where == "textured":
                # Not the crop's border either: a painting's contrast drawn there (where the convolutions' zero
                # padding lets the branch tell it is at an edge) would pass for texture, and `upscale --ref` then
                # framed whole images with dark strokes (docs/sheets/x8-imle-textured-step450-style-in2-whole.png).
                style_masks = away_from_border(1 - flats[:k], 2 * opt.scale), 1 - flat_mask(ref)
            losses["style"] = feature_stats_loss(vgg, sr_ref, ref, *style_masks)
            losses["kl"] = kl_divergence(mu, logvar)
            losses["lr_cons"] = (losses["lr_cons"] * b + lr_consistency(sr_ref, lr[:k], opt.scale) * k) / (b + k)
            fakes.append(sr_ref)
            if opt.flat_weight > 0:
                detailed.append(sr_ref)
        if detailed:
            losses["flat"] = torch.stack([detail_on_flats(x, flats[:len(x)]) for x in detailed]).mean()
        real, fake = window(hr), window(torch.cat(fakes))
        return losses, (real, fake)

    @torch.no_grad()
    def nearest(self, m: int, lr, fidelity, f_mu, f_sigma, z, grain, window, target) -> torch.Tensor:
        """Of the m latents (z and grain) of each crop, in order, the index of the one whose output is nearest the
        HR crop (whose windows' features are `target`)."""
        b, chunk = len(lr), max(1, 32 // m) * m  # whole crops a chunk (bounded memory): one normaliser a crop
        distances = []
        for i in range(0, b * m, chunk):
            part = slice(i, i + chunk)
            crop = torch.arange(b * m)[part] // m
            sr = self.decode(lr[crop], fidelity[crop], f_mu[crop], f_sigma[crop], z[part],
                             None if grain is None else [g[part] for g in grain])
            distances.append(feature_distance(self.model.vgg, window(sr), [t[crop] for t in target]))
        return torch.arange(b) * m + torch.cat(distances).view(b, m).argmin(1).cpu()

    @staticmethod
    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if torch.is_tensor(x) else x

    def window(self, side: int, gen):
        """The perceptual_crop window of this step, the same for every image of the batch."""
        size = min(self.opt.perceptual_crop, side)
        y, x = (int(torch.randint(0, side - size + 1, (1,), generator=gen)) for _ in range(2))
        return lambda images: images[..., y:y + size, x:x + size]

    def export(self, step: int) -> None:
        save_model(self.model, self.opt.out / "last.safetensors", step=step, stage="texture")

    def validate(self) -> dict:
        """Prior samples (seeds 0 .. val_samples - 1, sample's temperature) of the validation crops, as `refsr eval
        --samples` measures them: mean PSNR-Y, SSIM, LPIPS, the lowest LR-PSNR and the diversity score."""
        from .checkpoint import load_backbone
        from .evaluate import diversity_score, measure
        from .engine import Upscaler
        from .metrics import LPIPSAlex, bicubic_resize
        lpips = LPIPSAlex()
        load_backbone(lpips, "lpips_alex")
        upscaler = Upscaler(self.model, self.device)
        rows = []
        try:
            for hr in self.val_crops:
                lr = bicubic_resize(hr, (hr.width // self.opt.scale, hr.height // self.opt.scale))
                zs = [upscaler.prior_z(seed, SAMPLE_TEMPERATURE) for seed in range(self.opt.val_samples)]
                samples = [Image.fromarray(a) for a in upscaler.upscale(np.asarray(lr, np.float32) / 255, zs)]
                each = [measure(s, hr, lr, self.opt.scale, lpips) for s in samples]
                row = {k: float(np.mean([e[k] for e in each])) for k in each[0]}
                row["lr_psnr"] = min(e["lr_psnr"] for e in each)
                if len(samples) >= 2:
                    row["diversity"] = diversity_score(samples, hr, lpips)
                rows.append(row)
        finally:
            self.model.float().to(memory_format=torch.channels_last).train()
            self.model.trunk.eval()
        return {f"val_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}


def check_pool_fits(opt: TrainOptions, config: RefVAEConfig, device) -> None:
    """Refuse, before anything is allocated, a texture stage whose crop pool (each crop with the trunk's features
    and output) and IMLE grain would take more than half the memory of the device they are held on: --pool-size
    100000 asked for about 100 GB at the defaults, and failed (or was killed) after minutes."""
    p = opt.lr_patch
    per_crop = 4 * (6 * (p * opt.scale) ** 2 + (3 + config.channels) * p * p)  # HR and fidelity, LR and features
    grain = 4 * opt.batch * opt.imle_samples * sum((p * 2 ** k) ** 2 for k in range(1, config.stages + 1))
    needed = opt.pool_size * per_crop + grain * config.texture_noise
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total / 2:
        raise RefsrError(f"--pool-size {opt.pool_size} crops of --lr-patch {p} at x{opt.scale} (with --batch "
                         f"{opt.batch} x --imle-samples {opt.imle_samples}) would take {needed / 2**30:.1f} GiB, more "
                         f"than half the {total / 2**30:.0f} GiB of {device.type}: lower them")


def validation_crops(folder: Path, side: int, multiple: int) -> list:
    """Centre crops of (at most) `side` pixels, a multiple of `multiple`, of the images of `folder`, as PIL images:
    a validation costs seconds, not the minutes of whole 2k photos. Read when the run starts, so that a folder with
    no usable image stops it then, not at its first validation: images under 32 pixels a side (LPIPS's least) or
    4 LR pixels at `multiple` are left out."""
    from .evaluate import LPIPS_MIN_SIDE
    crops = []
    for image in load_training_images([folder], max(LPIPS_MIN_SIDE, 4 * multiple)):
        h, w = image.shape[:2]
        n = min(side, h, w) // multiple * multiple
        y, x = (h - n) // 2, (w - n) // 2
        crops.append(Image.fromarray(np.ascontiguousarray(image[y:y + n, x:x + n])))
    return crops


def texture_model(opt: TrainOptions, state: dict | None):
    """The texture stage's model: the resumed one; --init's (a trunk-stage checkpoint gets a fresh texture branch
    of today's design); a fresh one of opt.config; or the shipped weights of opt.scale, continued."""
    if state is not None:
        model = build_model(state["config"])
        model.load_state_dict(state["module"], strict=False)
        return model
    if opt.init is not None and len(opt.init) != 1:
        raise RefsrError("--init: the texture stage starts from one checkpoint")
    if opt.init is None and opt.config is not None:
        torch.manual_seed(opt.seed)
        return build_model(replace(opt.config, scale=opt.scale))
    weights = load_weights(opt.init[0] if opt.init else None, opt.scale)
    if not weights.texture_trained:
        return fresh_texture_branch(weights.model, opt)
    return with_noise_gate(weights.model)


def with_noise_gate(model):
    """A texture checkpoint of a design without the noise gate, continued with one: the gate starts at 1
    everywhere, so the model computes what it did and training can take the grain off flat areas."""
    if not model.config.texture_noise or model.config.noise_gate:
        return model
    extended = build_model(replace(model.config, noise_gate=True))
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("noise_gate.") for k in missing), (missing, unexpected)
    return extended


def fresh_texture_branch(trunk_checkpoint, opt: TrainOptions):
    """A trunk-stage checkpoint's trunk under a freshly initialised texture branch of today's design (opt.config's
    texture fields): the checkpoint's own branch was never trained, and may be of an older design."""
    c = trunk_checkpoint.config
    torch.manual_seed(opt.seed)
    model = build_model(replace(opt.config or RefVAEConfig(), scale=opt.scale, channels=c.channels,
                                lr_blocks=c.lr_blocks, up_channels=c.up_channels))
    model.trunk.load_state_dict(trunk_checkpoint.trunk.state_dict())
    return model


def init_trunk(trunk: FidelityTrunk, config: RefVAEConfig, paths) -> None:
    """Continue from trunk checkpoints (one per scale, as the trunk stage writes them): the shared body from any of
    them (they must agree), each one's tail; a scale with no checkpoint starts its tail as bicubic."""
    body = None
    for path in paths:
        model = load_weights(path).model
        if trunk_architecture(model.config) != trunk_architecture(config):
            raise RefsrError(f"--init {path}: not a trunk checkpoint of this architecture "
                             f"({trunk_architecture(config)})")
        state = model.trunk.state_dict()
        shared = {k: v for k, v in state.items() if not k.startswith("tails.")}
        if body is not None and any(not torch.equal(body[k], v) for k, v in shared.items()):
            raise RefsrError(f"--init {path}: its trunk differs from the other --init checkpoints'")
        body = shared
        if f"x{model.config.scale}" not in trunk.tails:
            raise RefsrError(f"--init {path}: a x{model.config.scale} checkpoint, not one of --scales")
        trunk.load_state_dict(state, strict=False)


def trunk_architecture(config: RefVAEConfig) -> dict:
    return {"channels": config.channels, "lr_blocks": config.lr_blocks, "up_channels": list(config.up_channels)}


def recipe(opt: TrainOptions) -> dict:
    """The options a resumed run must share with the run it continues (--steps may grow)."""
    keys = ["stage", "seed", "batch", "lr_patch", "learning_rate"]
    keys += ["scales"] if opt.stage == "trunk" else ["scale", "modulation_lr_scale", "imle_samples", "pool_size",
                                                      "crop_uses"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(opt, k)) for k in keys)}


def train(opt: TrainOptions, progress=None) -> Path:
    """Run `opt`; return the path of its last checkpoint (of the largest scale, for the trunk stage)."""
    fit(opt, progress)
    return opt.out / (f"x{max(opt.scales)}.safetensors" if opt.stage == "trunk" else "last.safetensors")


def fit(opt: TrainOptions, progress=None):
    """The training loop; returns the trained module (on every rank, under torchrun).

    `progress(step, steps, losses, steps_per_second)` is called after every step, on rank 0; after a validation,
    `losses` also holds its val_* measures."""
    rank, world, device = start_distributed(pick_device(opt.device))
    state_path = opt.out / "last.state.safetensors"
    written = {state_path, opt.out / "last.safetensors", *(opt.out / f"x{s}.safetensors" for s in opt.scales)}
    clash = [p for p in opt.init or [] if Path(p).resolve() in {w.resolve() for w in written}]
    if clash:
        raise RefsrError(f"--init {clash[0]}: this run would write over it; copy it out of {opt.out} first")
    if opt.resume and not state_path.is_file():
        raise RefsrError(f"--resume: no checkpoint to resume in {opt.out}")
    if not opt.resume and not opt.overwrite:
        # Any checkpoint already in --out is the user's, with or without a training state beside it.
        held = [p for p in sorted(written) if p.exists()]
        if held:
            raise RefsrError(f"{opt.out} holds a run already ({held[0].name}): --resume it, --overwrite it, or give "
                             "another --out")
    if rank == 0:
        make_run_folder(opt.out)
        if opt.overwrite and not opt.resume:  # a fresh run: the old one's state and log would mislead a --resume
            state_path.unlink(missing_ok=True)
            (opt.out / "log.jsonl").unlink(missing_ok=True)
    state = load_training_state(state_path, recipe(opt)) if opt.resume else None
    stage = (TrunkStage if opt.stage == "trunk" else TextureStage)(opt, device, rank, state)
    optimizer = torch.optim.Adam(stage.parameter_groups(), lr=opt.learning_rate, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    disc = disc_optimizer = None
    if opt.stage == "texture" and opt.adv_weight > 0:
        torch.manual_seed(opt.seed + 1)
        disc = PatchDiscriminator().to(device).train()
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=opt.learning_rate, betas=(0.5, 0.99))
    step = 0
    if state is not None:
        step = state["step"]
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # a state saved without CUDA has an empty scaler: a CUDA run starts its own
            scaler.load_state_dict(state["scaler"])
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
    weights = {"l1": opt.l1_weight, "lr_cons": opt.lr_consistency_weight, "imle": opt.imle_weight,
               "content": opt.content_weight, "style": opt.style_weight, "kl": opt.kl_weight, "adv": opt.adv_weight,
               "flat": opt.flat_weight}
    log = open_log(opt.out / "log.jsonl", step, opt.resume) if rank == 0 else None

    def save(step):
        bad = not_finite(stage.trained_state())
        if bad is not None:  # a step that diverged: the last checkpoint saved stays the run's
            raise RefsrError(f"step {step}: the weights are no longer finite numbers ({bad}); nothing was saved and "
                             "the last checkpoint is kept: lower --learning-rate")
        # The training state first: --resume reads only it, so a kill between the writes loses nothing.
        save_training_state(state_path, stage, step, optimizer, scaler, recipe(opt), disc, disc_optimizer)
        stage.export(step)

    try:
        started, start_step = time.time(), step
        while step < opt.steps:
            set_learning_rate(filter(None, (optimizer, disc_optimizer)), opt, step)
            # AMP on CUDA (float16 activations, float32 weights and loss scaling); a no-op elsewhere.
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                losses, windows = stage.losses(step)
                if disc is not None:
                    losses["adv"] = generator_adversarial(disc, windows[1])
            loss = sum(weights[k] * v for k, v in losses.items() if k in weights)
            descend(loss, optimizer, stage.module, world, step, scaler)
            if disc is not None:
                losses["disc"] = discriminator_loss(disc, *windows)
                descend(losses["disc"], disc_optimizer, disc, world, step)
            step += 1
            if rank == 0:
                record(opt, log, progress, step, start_step, started, {"loss": loss} | losses,
                       optimizer.param_groups[0]["lr"], stage.validate if opt.val else None, lambda: save(step))
        return stage.module
    finally:
        if log is not None:
            log.close()
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def make_run_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RefsrError(f"--out {out}: a file stands where the run folder or one of its parents would be") from None
    except OSError as e:
        raise RefsrError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
    # Left by a run killed (SIGKILL) in the middle of a save: atomic_path's temporary names, and safetensors' own
    # (".tmp" and six characters), which it writes before renaming onto ours.
    for stale in [*out.glob(".*.tmp"), *(p for p in out.glob(".tmp*") if re.fullmatch(r"\.tmp\w{6}", p.name))]:
        stale.unlink(missing_ok=True)


def start_distributed(device: torch.device):
    """(rank, world size, device) under torchrun (WORLD_SIZE set), else (0, 1, device). The launcher's variables
    are checked as upscale checks them (one line naming a bad one)."""
    found = launcher()
    if found is None or found[1] == 1:
        return 0, 1, device
    rank, world, rank_name = found
    if rank_name != "RANK":  # srun alone: copies that know nothing of each other, all writing one run folder
        raise RefsrError(f"SLURM_NTASKS={world}: train's ranks are started by torchrun (srun torchrun "
                         "--nproc_per_node=N refsr train ...), not by srun alone")
    import torch.distributed as dist
    if device.type == "cuda":
        local = environment_int("LOCAL_RANK") or 0
        if local >= torch.cuda.device_count():
            raise RefsrError(f"LOCAL_RANK={local} is not below the {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def descend(loss, optimizer, module, world: int, step: int, scaler=None) -> None:
    """One optimizer step of `module` on `loss`, with the gradients averaged over the ranks (through the AMP loss
    scaler, when given: a no-op off CUDA); a non-finite loss stops the run."""
    if not torch.isfinite(loss):
        raise RefsrError(f"step {step}: the loss is {loss.item()}; the last checkpoint is kept: lower "
                         "--learning-rate or check the data")
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    average_gradients(module, world)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def average_gradients(module, world: int) -> None:
    """Under torchrun: every rank's gradients replaced by their mean over the ranks, so that every rank takes the
    same step (data parallelism without a wrapper around the model: a stage's step calls several of its methods)."""
    if world == 1:
        return
    import torch.distributed as dist
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def record(opt: TrainOptions, log, progress, step: int, start_step: int, started: float, measures: dict,
           learning_rate: float, validate, save) -> None:
    """Rank 0's bookkeeping after a step: a log row every log_every steps, validation every val_every, `save()`
    every save_every, and the progress callback."""
    measures = {k: v.item() if torch.is_tensor(v) else v for k, v in measures.items()}
    row = {}
    if step % opt.log_every == 0 or step == opt.steps:
        row = {"step": step, **measures, "learning_rate": learning_rate, "seconds": round(time.time() - started, 1)}
    if validate is not None and (step % opt.val_every == 0 or step == opt.steps):
        row = {"step": step, **row, **validate()}
    if row:
        try:
            log.write(json.dumps(row) + "\n")
            log.flush()
        except OSError as e:  # a full disk: a row cut short is dropped by the next --resume (open_log)
            raise RefsrError(f"cannot write {log.name} ({e.strerror or e}); the last checkpoint is kept") from None
    if step % opt.save_every == 0 or step == opt.steps:
        save()
    if progress is not None:
        losses = {k: v for k, v in measures.items() if k not in ("scale", "loss")}
        progress(step, opt.steps, losses | {k: v for k, v in row.items() if k.startswith("val_")},
                 (step - start_step) / max(time.time() - started, 1e-9))


def set_learning_rate(optimizers, opt: TrainOptions, step: int) -> None:
    """Cosine decay to a tenth over the whole run, so that a resumed run lands on the same schedule."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = (opt.learning_rate * group.get("lr_scale", 1.0)
                           * (0.55 + 0.45 * math.cos(math.pi * step / opt.steps)))


def open_log(path: Path, step: int, resumed: bool):
    """log.jsonl for appending; on resume, the rows after the checkpoint's step are dropped (they are redone), and so
    is a row cut short by a kill or a full disk."""
    if resumed and path.exists():
        def kept(row: str) -> bool:
            try:
                return json.loads(row)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False
        rows = [r for r in path.read_text(errors="replace").splitlines() if r.strip() and kept(r)]
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(r + "\n" for r in rows))
    return open(path, "a")


# --- training states: what `refsr train --resume` continues from ------------------------------------------------

STATE_FORMAT = "refsr-training-state-2"


def _optimizer_tensors(prefix: str, optimizer) -> dict:
    return {f"{prefix}.{i}.{k}": v for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()
            if torch.is_tensor(v)}


def _optimizer_state(tensors: dict, prefix: str, param_groups: list) -> dict:
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def save_training_state(path, stage, step: int, optimizer, scaler, recipe: dict, disc=None,
                        disc_optimizer=None) -> None:
    """The trained module of a training stage, its optimizer, the loss scaler and the step (and the
    discriminator) in one file, so that they can never be from different steps."""
    tensors = {f"module.{k}": v for k, v in stage.trained_state().items()}
    tensors.update(_optimizer_tensors("optimizer", optimizer))
    meta = {"format": STATE_FORMAT, "stage": stage.name, "step": str(step), "config": stage.config.to_json(),
            "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "scaler": json.dumps(scaler.state_dict()), "recipe": json.dumps(recipe)}
    if disc is not None:
        tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        tensors.update(_optimizer_tensors("disc_optimizer", disc_optimizer))
        meta["disc_param_groups"] = json.dumps(disc_optimizer.state_dict()["param_groups"])
    atomic_save(tensors, path, meta)


def load_training_state(path, recipe: dict) -> dict:
    """What save_training_state wrote: {meta, config, step, module, optimizer, scaler[, disc, disc_optimizer]};
    refused unless it was written by a run of the same `recipe`."""
    meta = read_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise RefsrError(f"--resume: {path} is not a training state this refsr reads")
    try:
        trained_with = json.loads(meta["recipe"])
        if trained_with != recipe:
            changed = sorted(k for k in recipe if trained_with.get(k) != recipe[k])
            raise RefsrError(f"--resume: {path} was trained with {trained_with}; resume with the same options "
                             f"({', '.join(changed)} differ)")
        tensors = read_weights(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = {"meta": meta, "config": stored_config(meta, path), "step": int(meta["step"]),
                 "module": part("module."), "scaler": json.loads(meta["scaler"]),
                 "optimizer": _optimizer_state(tensors, "optimizer", json.loads(meta["param_groups"]))}
        if "disc_param_groups" in meta:
            state["disc"] = part("disc.")
            state["disc_optimizer"] = _optimizer_state(tensors, "disc_optimizer",
                                                       json.loads(meta["disc_param_groups"]))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise RefsrError(f"--resume: {path} is a damaged training state ({type(e).__name__}: {e})") from None
    return state
