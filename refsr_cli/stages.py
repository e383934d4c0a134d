"""The two stages `refsr train` runs (train.py's loop), behind one interface, Stage:

    trunk    the FidelityTrunk of every --scales at once (one shared body, a tail per scale; the scales take turns
             batch by batch), under pixel L1 and LR-consistency L1. Writes x{scale}.safetensors for each scale.
    texture  the texture branch of one --scale on a frozen trunk. Prior samples are trained by implicit maximum
             likelihood (IMLE; Li and Malik 2018, Peng and Li's HyperRIM and CHIMLE for SR): each crop is decoded
             for --imle-samples latents without gradients, and only the one nearest the HR crop under a VGG16 feature
             distance is trained towards it, so that every HR has a sample near it and the samples spread over the
             plausible textures instead of agreeing on their mean. A share of each batch is also decoded from a
             reference's mean z (another crop of the same photo, or a gallery image) under a content and a style
             term, so that a reference sets the look; with --adv-weight, a PatchGAN critic of its own judges the
             outputs. Writes last.safetensors.
"""
import os
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import build_model, load_weights, save_model
from .errors import RefsrError, shown
from .losses import (PatchDiscriminator, away_from_border, detail_on_flats, discriminator_loss, feature_distance,
                     feature_stats_loss, flat_mask, generator_adversarial, kl_divergence, lr_consistency)
from .model import FidelityTrunk, RefVAEConfig
from .options import SAMPLE_TEMPERATURE, TrainOptions
from .train_data import CropPool, load_training_images, pixel_batch, resized, seeded, to_tensor


class StepLosses(NamedTuple):
    terms: dict  # the loss terms of a step, by name: the loop weighs them by TrainOptions' *_weight and descends
    notes: dict  # plain values logged beside them (the trunk stage: the scale of the step)


class Stage(Protocol):
    """What train.py's loop needs of a stage."""
    name: str  # "trunk" or "texture", as --stage names it (and the training state records it)
    config: RefVAEConfig  # the architecture, stored with every checkpoint
    module: torch.nn.Module  # what the optimizer trains
    critic: "Critic | None"  # a discriminator trained beside it, or None

    def parameter_groups(self) -> list: ...  # the optimizer's groups, each with an "lr_scale"

    def trained_state(self) -> dict: ...  # what the training state holds of the module

    def losses(self, step: int) -> StepLosses: ...  # the losses of step `step` (its batch drawn from the step)

    def export(self, step: int) -> None: ...  # write the checkpoints that upscale loads

    def validate(self) -> dict: ...  # val_* measures on the --val crops (rank 0)


def initialised(seed: int, make):
    """`make()` with torch's generator seeded first: a fresh module's weights depend on the run's seed alone."""
    torch.manual_seed(seed)
    return make()


class Critic:
    """The texture stage's PatchGAN discriminator and its optimizer. generator_loss() judges a step's fake windows
    for the generator's loss and keeps the step's windows; loss() is then the discriminator's own, on them."""

    MIN_SIDE = 24  # three stride-2 convolutions, then instance norm: it needs 2x2 of what is left

    def __init__(self, opt: TrainOptions, device):
        self.module = initialised(opt.seed + 1, PatchDiscriminator).to(device).train()
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=opt.learning_rate, betas=(0.5, 0.99))
        self.windows = None

    def generator_loss(self, real, fake):
        self.windows = real, fake
        return generator_adversarial(self.module, fake)

    def loss(self):
        return discriminator_loss(self.module, *self.windows)


class TrunkStage:
    """The fidelity trunk of every scale in opt.scales, trained together."""

    name = "trunk"
    critic = None

    def __init__(self, opt: TrainOptions, device, rank: int, state: dict | None):
        self.opt, self.device, self.rank = opt, device, rank
        if state is not None:
            self.config = state["config"]
        else:
            self.config = opt.config or RefVAEConfig()
        c = self.config
        check_memory(opt, c, device, self.name)
        self.module = initialised(opt.seed, lambda: FidelityTrunk(c.channels, c.lr_blocks, c.up_channels, opt.scales))
        self.module.to(device).train()
        if state is not None:
            resumed_module(self.module, state["module"], self.module.state_dict())
        else:
            init_trunk(self.module, c, opt.init or [])
        self.images = load_training_images(opt.data, opt.lr_patch * max(opt.scales))
        self.val_crops = None
        if opt.val is not None and rank == 0:
            self.val_crops = [np.asarray(c) for c in validation_crops(opt.val, 480, 8)]
        # One model per scale, filled with the trunk at each export: their texture branch stays at its initial
        # state (a zero output layer: every z gives the trunk's output until the texture stage trains it).
        self.exports = initialised(opt.seed, lambda: {s: build_model(replace(c, scale=s)) for s in opt.scales}
                                   ) if rank == 0 else {}

    def parameter_groups(self):
        return [{"params": list(self.module.parameters()), "lr_scale": 1.0}]

    def trained_state(self) -> dict:
        return self.module.state_dict()

    def losses(self, step: int) -> "StepLosses":
        scale = self.opt.scales[step % len(self.opt.scales)]
        rng = seeded("step", self.opt.seed, step, self.rank)
        hr, lr = (t.to(self.device) for t in pixel_batch(self.images, self.opt.batch, self.opt.lr_patch, scale, rng))
        sr = self.module(lr, scale).float()
        return StepLosses({"l1": F.l1_loss(sr, hr), "lr_cons": lr_consistency(sr, lr, scale)}, {"scale": scale})

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
        check_memory(opt, self.config, device, self.name)
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
        self.critic = None
        if opt.adv_weight > 0:
            if min(opt.perceptual_crop, opt.lr_patch * opt.scale) < Critic.MIN_SIDE:
                raise RefsrError(f"--adv-weight: the critic judges windows of at least {Critic.MIN_SIDE} HR pixels, "
                                 f"and --lr-patch {opt.lr_patch} at x{opt.scale} gives {opt.lr_patch * opt.scale}")
            self.critic = Critic(opt, device)

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

    def losses(self, step: int) -> "StepLosses":
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
        if self.critic is not None:
            losses["adv"] = self.critic.generator_loss(window(hr), window(torch.cat(fakes)))
        return StepLosses(losses, {})

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


# Memory of a training step a crop, per HR pixel of the crop, measured on the CPU at the defaults (`/usr/bin/time`
# of one step at --batch 2 and 8, --lr-patch 24, x8): the trunk stage 440 bytes, the texture stage 2 700 (its
# decodes, the VGG16 of the feature distances, the gradients). Rounded up: an estimate, not a promise.
STEP_BYTES = {"trunk": 500, "texture": 3000}


def check_memory(opt: TrainOptions, config: RefVAEConfig, device, stage: str) -> None:
    """Refuse, before anything is allocated, a run whose batch (and, for the texture stage, crop pool with the
    trunk's features and output, and IMLE grain) would take more than half the memory of its device: --pool-size
    100000 asked for about 100 GB at the defaults, --batch 100000 for 24 GB and more, and either was killed after
    minutes."""
    p, scale = opt.lr_patch, opt.scale if stage == "texture" else max(opt.scales)
    needed = opt.batch * (p * scale) ** 2 * STEP_BYTES[stage]
    if stage == "texture":
        per_crop = 4 * (6 * (p * scale) ** 2 + (3 + config.channels) * p * p)  # HR and fidelity, LR and features
        grain = 4 * opt.batch * opt.imle_samples * sum((p * 2 ** k) ** 2 for k in range(1, config.stages + 1))
        needed += opt.pool_size * per_crop + grain * config.texture_noise
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total / 2:
        held = f"--pool-size {opt.pool_size} crops and " if stage == "texture" else ""
        gib = needed / 2 ** 30
        gib = f"{gib:.1f}" if gib < 1e6 else f"{gib:.1e}"  # a 20-digit --lr-patch: not a 35-digit number
        raise RefsrError(f"{held}--batch {opt.batch} of --lr-patch {p} at x{scale}"
                         + (f" (--imle-samples {opt.imle_samples})" if stage == "texture" else "")
                         + f" would take about {gib} GiB, more than half the {total / 2**30:.0f} GiB "
                         f"of {device.type}: lower them")


def validation_crops(folder: Path, side: int, multiple: int) -> list:
    """Centre crops of (at most) `side` pixels, a multiple of `multiple`, of the images of `folder`, as PIL images:
    a validation costs seconds, not the minutes of whole 2k photos. Read when the run starts, so that a folder with
    no usable image stops it then, not at its first validation: images under 32 pixels a side (LPIPS's least) or
    4 LR pixels at `multiple` are left out."""
    from .evaluate import LPIPS_MIN_SIDE
    crops = []
    try:
        images = load_training_images([folder], max(LPIPS_MIN_SIDE, 4 * multiple))
    except RefsrError as e:
        raise RefsrError(f"--val {folder}: {e}") from None
    for image in images:
        h, w = image.shape[:2]
        n = min(side, h, w) // multiple * multiple
        y, x = (h - n) // 2, (w - n) // 2
        crops.append(Image.fromarray(np.ascontiguousarray(image[y:y + n, x:x + n])))
    return crops


def resumed_module(module: torch.nn.Module, tensors: dict, trained: dict) -> None:
    """A resumed run's module put back from its training state: exactly the tensors `trained` names (what the stage's
    trained_state saves), each of its shape. Any other state is damaged: none of the module starts afresh unsaid."""
    if set(tensors) != set(trained):
        odd = sorted(set(tensors) ^ set(trained))
        raise RefsrError(f"--resume: a damaged training state (its module lacks or adds {len(odd)} tensors, "
                         f"{shown(', '.join(odd))})")
    for name, tensor in tensors.items():
        if tensor.shape != trained[name].shape:
            raise RefsrError(f"--resume: a damaged training state ({name} is {tuple(tensor.shape)}, the module's "
                             f"{tuple(trained[name].shape)})")
    module.load_state_dict(tensors, strict=False)


def texture_model(opt: TrainOptions, state: dict | None):
    """The texture stage's model, started one way: the checkpoint it continues (the resumed state's exactly; else
    --init's, by default the shipped weights of --scale) brought to the design this refsr trains by migrated(); or,
    given a config and no --init, a fresh model of it."""
    if state is not None:
        model = build_model(state["config"])
        resumed_module(model, state["module"], model.trainable_state_dict())
        return model
    if opt.init is not None and len(opt.init) != 1:
        raise RefsrError("--init: the texture stage starts from one checkpoint")
    if opt.init is None and opt.config is not None:
        return initialised(opt.seed, lambda: build_model(replace(opt.config, scale=opt.scale)))
    return migrated(load_weights(opt.init[0] if opt.init else None, opt.scale), opt)


def migrated(weights, opt: TrainOptions):
    """A checkpoint's model in the design this refsr trains. A trunk-stage checkpoint's branch was never trained
    (and may be of an older design): its trunk goes under a fresh branch of opt.config's texture fields. A texture
    branch without the noise gate gets one that starts at 1 everywhere, so that the model computes what it did and
    training can take the grain off flat areas."""
    model = weights.model
    if not weights.texture_trained:
        c = model.config
        fresh = initialised(opt.seed, lambda: build_model(replace(
            opt.config or RefVAEConfig(), scale=opt.scale, channels=c.channels, lr_blocks=c.lr_blocks,
            up_channels=c.up_channels)))
        fresh.trunk.load_state_dict(model.trunk.state_dict())
        return fresh
    if not model.config.texture_noise or model.config.noise_gate:
        return model
    extended = build_model(replace(model.config, noise_gate=True))
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("noise_gate.") for k in missing), (missing, unexpected)
    return extended


def init_trunk(trunk: FidelityTrunk, config: RefVAEConfig, paths) -> None:
    """Continue from trunk checkpoints (one per scale, as the trunk stage writes them): the shared body from any of
    them (they must agree), each one's tail; a scale with no checkpoint starts its tail as bicubic."""
    body, seen = None, {}
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
            raise RefsrError(f"--init {path}: an x{model.config.scale} checkpoint, not one of --scales")
        if model.config.scale in seen:  # else the later one's tail would silently win
            raise RefsrError(f"--init {path}: a second x{model.config.scale} checkpoint, beside "
                             f"{seen[model.config.scale]}; give one per scale")
        seen[model.config.scale] = path
        trunk.load_state_dict(state, strict=False)


def trunk_architecture(config: RefVAEConfig) -> dict:
    return {"channels": config.channels, "lr_blocks": config.lr_blocks, "up_channels": list(config.up_channels)}
