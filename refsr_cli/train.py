"""`refsr train`: trains the very modules that inference loads, and writes checkpoints it loads directly.

Two stages (--stage). `trunk` (fit_trunk, at the end of this file) trains the FidelityTrunk of x2, x4 and x8 at once
with pixel L1 and LR-consistency L1, and writes one loadable checkpoint per scale. `texture` (fit) trains a whole
model of one scale; a trunk architecture's trunk stays frozen, so only the texture branch learns.

A run folder holds `last.safetensors` (the model, loadable by `upscale --weights`), `last.state.safetensors` (model
and optimizer, for --resume) and `log.jsonl` (one line of losses per logged step). Batches are drawn from a generator
seeded by (seed, step, rank), so a resumed run sees exactly the batches the uninterrupted run would have seen.

Under `torchrun --nproc_per_node=N refsr train ...` (WORLD_SIZE set) the same loop runs with DistributedDataParallel:
gloo on the CPU, NCCL on CUDA; every rank draws its own batch of --batch samples, rank 0 alone writes checkpoints, logs
and validation.

The objective (the RefVAE paper, eq. 6-9), each term a flag whose default is the paper's weight: pixel L1, L1 of
the bicubic downscale (LR consistency), L1 on VGG16 relu4_1 (content), channel mean/std of VGG16 features against a gallery
reference (style), LPIPS, total variation, KL, a PatchGAN discriminator, and the released code's multi-scale pixel L1.
The VGG, LPIPS and discriminator terms see one random `perceptual_crop`-pixel window of each sample: a quarter of
the cost of the whole 256-pixel crop, at the same pixel scale.
"""
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .checkpoint import atomic_save, build_model, load_backbone, load_checkpoint, read_metadata, save_model
from .errors import RefsrError
from .images import list_images, read_rgb
from .metrics import LPIPSAlex, psnr_y
from .model import FidelityTrunk, RefVAEConfig, VGG16Features, downscale, kl_divergence


@dataclass
class TrainOptions:
    data: list
    out: Path
    refs: list | None = None
    scale: int = 8
    steps: int = 2000
    batch: int = 8
    lr_patch: int = 32
    learning_rate: float = 1e-4  # the paper's
    # Learning-rate factor of the zero-initialised parameters that let z and the noise reach the image (noise
    # strengths, z modulation): at the base rate they grew to ~0.01 in 900 steps, and samples barely differed.
    modulation_lr_scale: float = 1.0
    # Loss weights: the paper's (eq. 6-9) where it gives one.
    l1_weight: float = 1.0  # content: pixel L1
    lr_consistency_weight: float = 1.0  # content: L1 of the bicubic downscale (the released code uses 100)
    content_weight: float = 1.0  # content: L1 of VGG16 relu4_1 features
    style_weight: float = 10.0  # channel mean/std of VGG16 relu1_2..relu4_1 against the reference
    lpips_weight: float = 1.0
    tv_weight: float = 1.0
    kl_weight: float = 1.0
    adv_weight: float = 5e-3  # the paper gives none; ESRGAN's
    multiscale_weight: float = 0.0  # the released code's pixel L1 at 1/2 and 1/4 size; not in the paper
    ref_mix: float = 0.5  # share of each batch that takes a gallery reference (only with refs)
    # Share of each batch decoded with z = 0, the prior's mean, under the pixel terms alone: what makes
    # `sample --temperature 0` the fidelity (PSNR) output. Not in the paper, whose z = 0 decodes whatever it decodes.
    mean_share: float = 0.25
    perceptual_crop: int = 128  # HR pixels seen by the VGG, LPIPS and discriminator terms
    val: Path | None = None  # folder of HR images measured (PSNR, LPIPS at z = 0) every val_every steps
    val_every: int = 500
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    init: list | None = None  # checkpoints to start from: one for the texture stage; one per scale for the trunk
    device: str = "cpu"
    config: RefVAEConfig = RefVAEConfig()  # the architecture of a fresh run (--resume and --init bring their own)
    # "texture": the whole model with the pixel, perceptual, style, KL and adversarial terms (a trunk
    # architecture's trunk stays frozen); "trunk": the fidelity trunk alone, for every scale in `scales` at once,
    # under the pixel and LR-consistency terms.
    stage: str = "texture"
    scales: tuple = (2, 4, 8)


def load_training_images(folders, min_side: int) -> list:
    """uint8 HxWx3 arrays of the images in `folders` whose short side is at least `min_side`."""
    paths = [p for folder in folders for p in list_images(folder)]
    if not paths:
        raise RefsrError(f"no images found in {', '.join(map(str, folders))}")
    images = []
    for p in paths:
        rgb = read_rgb(p)
        if min(rgb.shape[:2]) >= min_side:
            images.append((rgb * 255).round().astype(np.uint8))
    if not images:
        raise RefsrError(f"no training image is at least {min_side} px on its short side")
    return images


def random_crop(img: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
    crop = img[y:y + size, x:x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.rot90(crop, rng.randrange(4))


def to_tensor(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrays])).permute(0, 3, 1, 2).float() / 255


def batch_seed(opt: TrainOptions, step: int, rank: int = 0) -> int:
    return opt.seed * 1_000_003 + step + rank * 10 ** 12


def crop_and_lr(images, lr_patch: int, scale: int, rng: random.Random):
    """One random HR crop (as a PIL image) and its PIL-bicubic LR (the evaluation's degradation, uint8 quantisation
    included)."""
    crop = random_crop(images[rng.randrange(len(images))], lr_patch * scale, rng)
    pil = Image.fromarray(np.ascontiguousarray(crop))
    return pil, np.asarray(pil.resize((lr_patch,) * 2, Image.BICUBIC))


def make_batch(images, refs, opt: TrainOptions, step: int, ref_size: int, rank: int = 0):
    """HR crops, their PIL-bicubic LR, and the reference of each sample (the HR crop itself, or from the gallery)."""
    rng = random.Random(batch_seed(opt, step, rank))
    hr, lr, ref, from_gallery = [], [], [], []
    for _ in range(opt.batch):
        pil, small = crop_and_lr(images, opt.lr_patch, opt.scale, rng)
        hr.append(np.asarray(pil))
        lr.append(small)
        gallery = bool(refs) and rng.random() < opt.ref_mix
        source = Image.fromarray(refs[rng.randrange(len(refs))]) if gallery else pil
        ref.append(np.asarray(source.resize((ref_size,) * 2, Image.BICUBIC)))
        from_gallery.append(gallery)
    return to_tensor(hr), to_tensor(lr), to_tensor(ref), torch.tensor(from_gallery)


def feature_stats_loss(vgg: VGG16Features, x, ref):
    """Style: L1 between channel means and standard deviations of VGG16 features (relu1_2 .. relu4_1), with `x`
    resized to the reference's size (the size the reference encoder sees)."""
    x = F.interpolate(x, size=ref.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    loss = 0
    for a, b in zip(vgg(x, all_layers=True), vgg(ref, all_layers=True)):
        loss = loss + F.l1_loss(a.mean((2, 3)), b.mean((2, 3))) + F.l1_loss(a.std((2, 3)), b.std((2, 3)))
    return loss


def total_variation(x):
    """Mean squared first-order gradient (the paper's eq. 8 with beta = 1, as a mean)."""
    return (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean() + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()


def multiscale_l1(sr, hr):
    return sum(F.l1_loss(downscale(sr, f), downscale(hr, f)) for f in (2, 4))


def same_crop(size: int, *images, generator=None):
    """One random size x size window, the same in each of `images` (B, C, H, W)."""
    h, w = images[0].shape[-2:]
    if size >= min(h, w):
        return images
    y, x = (int(torch.randint(0, n - size + 1, (1,), generator=generator)) for n in (h, w))
    return tuple(im[..., y:y + size, x:x + size] for im in images)


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN of pix2pix (Isola et al. 2017), instance-normalised: one real/fake logit per patch.
    Training only: inference never builds it."""

    def __init__(self, width: int = 64):
        super().__init__()
        layers, cin = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for cout, stride in ((2 * width, 2), (4 * width, 2), (8 * width, 1)):
            layers += [nn.Conv2d(cin, cout, 4, stride, 1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x * 2 - 1)


STATE_FORMAT = "refsr-training-state"


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


def save_training_state(model, optimizer, scaler, path, step: int, opt: TrainOptions, disc=None,
                        disc_optimizer=None) -> None:
    """Model, optimizer, loss scaler (and discriminator) in one file, so that they can never be from different
    steps."""
    tensors = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    tensors.update(_optimizer_tensors("optimizer", optimizer))
    meta = {"format": STATE_FORMAT, "step": str(step), "config": model.config.to_json(),
            "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "scaler": json.dumps(scaler.state_dict()), "recipe": json.dumps(recipe(opt))}
    if disc is not None:
        tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        tensors.update(_optimizer_tensors("disc_optimizer", disc_optimizer))
        meta["disc_param_groups"] = json.dumps(disc_optimizer.state_dict()["param_groups"])
    atomic_save(tensors, path, meta)


def recipe(opt: TrainOptions) -> dict:
    """The options a resumed run must share with the run it continues (--steps may grow)."""
    return {k: getattr(opt, k) for k in ("seed", "batch", "lr_patch", "learning_rate", "modulation_lr_scale",
                                         "scale")}


def load_training_state(path, opt: TrainOptions):
    """(model, optimizer state dict, scaler state dict, step, discriminator state or None) from a file written by
    save_training_state; the discriminator state is (its state dict, its optimizer's state dict)."""
    from safetensors.torch import load_file
    model = load_checkpoint(path, opt.scale, fmt=STATE_FORMAT, prefix="model.").train()
    meta = read_metadata(path)
    if json.loads(meta["recipe"]) != recipe(opt):
        raise RefsrError(f"--resume: {path} was trained with {json.loads(meta['recipe'])}; resume with the same "
                         "--seed, --batch, --lr-patch, --learning-rate, --modulation-lr-scale and --scale")
    tensors = load_file(str(path))
    optimizer_state = _optimizer_state(tensors, "optimizer", json.loads(meta["param_groups"]))
    disc = None
    if "disc_param_groups" in meta:
        disc = ({k[len("disc."):]: v for k, v in tensors.items() if k.startswith("disc.")},
                _optimizer_state(tensors, "disc_optimizer", json.loads(meta["disc_param_groups"])))
    return model, optimizer_state, json.loads(meta["scaler"]), int(meta["step"]), disc


def start_distributed(device: torch.device):
    """(rank, world size, device) under torchrun (WORLD_SIZE set), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def validate(model, folder: Path, device) -> dict:
    """PSNR-Y, SSIM, LPIPS and LR-PSNR on the HR images of `folder` (the `refsr eval` protocol) of what this stage
    trains: a prior sample (seed 0, temperature 1) when the trunk is frozen, else z = 0."""
    from .evaluate import evaluate
    from .inference import Upscaler
    upscaler = Upscaler(model, device)
    z = upscaler.prior_z(0, 1.0 if model.config.arch == "trunk" else 0.0)
    try:
        means = evaluate(folder, upscaler, model.config.scale, z, baseline=False)["means"]["refsr"]
    finally:
        model.float().train()
    return {f"val_{k}": v for k, v in means.items()}


def train(opt: TrainOptions, progress=None) -> Path:
    """Run `opt` and return the path of its last checkpoint (of the largest scale, for the trunk stage)."""
    if opt.stage == "trunk":
        fit_trunk(opt, progress)
        return opt.out / f"x{max(opt.scales)}.safetensors"
    fit(opt, progress)
    return opt.out / "last.safetensors"


def resuming(opt: TrainOptions, state_path: Path) -> bool:
    """Whether this run continues the one in opt.out; refuses --resume without a run, and a new run over an old one."""
    if opt.resume and not state_path.is_file():
        raise RefsrError(f"--resume: no checkpoint to resume in {opt.out}")
    if not opt.resume and state_path.exists():
        raise RefsrError(f"{opt.out} holds a run already: --resume it, or give another --out")
    return opt.resume


def build_for_training(opt: TrainOptions, state_path: Path):
    """(model, resumed state or None): from --resume, --init, or freshly initialised from opt.config."""
    if resuming(opt, state_path):
        model, *resumed = load_training_state(state_path, opt)
        return model, resumed
    if opt.init:
        if len(opt.init) != 1:
            raise RefsrError("--init: the texture stage starts from one checkpoint")
        model = load_checkpoint(opt.init[0], opt.scale)
        if (read_metadata(opt.init[0]).get("stage") == "trunk" and model.config.arch == "trunk"
                and opt.config.arch == "trunk"):
            model = fresh_texture_branch(model, opt)
        return model, None
    torch.manual_seed(opt.seed)  # the same seed, the same initial weights (on every rank)
    return build_model(replace(opt.config, scale=opt.scale)), None


def fresh_texture_branch(trunk_checkpoint, opt: TrainOptions):
    """A trunk-stage checkpoint's trunk under a texture branch of today's design (opt.config's), freshly
    initialised: the checkpoint's own branch was never trained, and may be of an older design."""
    c = trunk_checkpoint.config
    torch.manual_seed(opt.seed)
    model = build_model(replace(opt.config, scale=opt.scale, channels=c.channels, lr_blocks=c.lr_blocks,
                                up_channels=c.up_channels))
    model.trunk.load_state_dict(trunk_checkpoint.trunk.state_dict())
    return model


MODULATION_PARAMETERS = ("noise_strength.", "z_to_style.")


def trainable_parameters(model, opt: TrainOptions) -> list:
    """Adam's parameter groups: everything but the frozen VGG16 and, in the trunk architecture, the trunk (the
    texture branch is trained on a finished trunk, so it can add texture but never cost fidelity); the modulation
    parameters in a group of their own, at opt.modulation_lr_scale times the rate."""
    if getattr(model, "trunk", None) is not None:
        model.trunk.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(("vgg.", "trunk."))]
    modulation = [p for n, p in named if n.startswith(MODULATION_PARAMETERS)]
    groups = [{"params": [p for n, p in named if not n.startswith(MODULATION_PARAMETERS)], "lr_scale": 1.0}]
    if modulation:
        groups.append({"params": modulation, "lr_scale": opt.modulation_lr_scale})
    return groups


class Objective:
    """The generator's loss terms, each weighted by its flag, and the discriminator's step."""

    def __init__(self, opt: TrainOptions, model, disc, device):
        self.opt, self.model, self.disc = opt, model, disc
        self.weights = {"l1": opt.l1_weight, "lr_cons": opt.lr_consistency_weight, "content": opt.content_weight,
                        "style": opt.style_weight, "lpips": opt.lpips_weight, "tv": opt.tv_weight,
                        "kl": opt.kl_weight, "adv": opt.adv_weight, "multiscale": opt.multiscale_weight}
        self.lpips = None
        if opt.lpips_weight > 0:
            self.lpips = LPIPSAlex()
            load_backbone(self.lpips, "lpips_alex")
            self.lpips.to(device)

    def generator_losses(self, sr, hr, lr, ref, gallery, prior_mean, mu, logvar, sr_p, hr_p) -> dict:
        """sr_p, hr_p: the perceptual_crop windows seen by the VGG, LPIPS and discriminator terms."""
        opt, w, vgg = self.opt, self.weights, self.model.vgg
        losses = {"l1": F.l1_loss(sr, hr), "lr_cons": F.l1_loss(downscale(sr, opt.scale), lr),
                  "kl": kl_divergence(mu.float(), logvar.float())}
        if w["multiscale"] > 0:
            losses["multiscale"] = multiscale_l1(sr, hr)
        if w["tv"] > 0:
            losses["tv"] = total_variation(sr)
        textured = ~prior_mean  # the z = 0 samples are trained for fidelity alone
        if textured.any():
            sr_t, hr_t = sr_p[textured], hr_p[textured]
            if w["content"] > 0:
                losses["content"] = F.l1_loss(vgg(sr_t), vgg(hr_t))
            if self.lpips is not None:
                losses["lpips"] = self.lpips(sr_t, hr_t).mean()
            if self.disc is not None:
                # -log D(G(x)), the non-saturating form of eq. 5. The bare discriminator, frozen: its DDP wrapper
                # would wait for gradients that this pass must not give it.
                self.disc.requires_grad_(False)
                losses["adv"] = F.softplus(-self.disc(sr_t)).mean()
                self.disc.requires_grad_(True)
        if gallery.any() and w["style"] > 0:
            losses["style"] = feature_stats_loss(vgg, sr[gallery], ref[gallery])
        return losses

    def total(self, losses: dict):
        return sum(self.weights[k] * v for k, v in losses.items())

    @staticmethod
    def discriminator_step(disc_net, disc_optimizer, hr_p, sr_p):
        """Every rank steps, on every sample (z = 0 outputs are fakes too): DDP needs all ranks in each step. One
        call for real and fake (instance norm keeps samples apart): DDP wants one forward per backward. In float32
        even on CUDA: the discriminator is small, and needs no loss scaler then."""
        real, fake = disc_net(torch.cat([hr_p, sr_p.detach()]).float()).chunk(2)
        d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_optimizer.step()
        return d_loss.detach()


def fit(opt: TrainOptions, progress=None):
    """The training loop; returns the trained model (on every rank, under torchrun).

    `progress(step, steps, losses, steps_per_second)` is called after every step, on rank 0; after a validation,
    `losses` also holds its val_* measures."""
    rank, world, device = start_distributed(torch.device(opt.device))
    cuda = device.type == "cuda"
    last, state_path = opt.out / "last.safetensors", opt.out / "last.state.safetensors"
    if rank == 0:
        opt.out.mkdir(parents=True, exist_ok=True)
        for stale in opt.out.glob(".last.*.tmp"):  # left by a run killed (SIGKILL) in the middle of a save
            stale.unlink()
    model, resumed = build_for_training(opt, state_path)
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(trainable_parameters(model, opt), lr=opt.learning_rate, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    disc = disc_optimizer = None
    if opt.adv_weight > 0:
        torch.manual_seed(opt.seed + 1)
        disc = PatchDiscriminator().to(device).train()
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=opt.learning_rate, betas=(0.5, 0.99))
    step = 0
    if resumed is not None:
        optimizer_state, scaler_state, step, disc_state = resumed
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(scaler_state)
        if disc is not None and disc_state is not None:
            disc.load_state_dict(disc_state[0])
            disc_optimizer.load_state_dict(disc_state[1])
    net, disc_net = model, disc
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if cuda else None
        net = DistributedDataParallel(model, device_ids=ids)
        if disc is not None:
            disc_net = DistributedDataParallel(disc, device_ids=ids)
    objective = Objective(opt, model, disc, device)
    images = load_training_images(opt.data, opt.lr_patch * opt.scale)
    refs = load_training_images(opt.refs, 1) if opt.refs else None
    log = open_log(opt.out / "log.jsonl", step, resumed is not None) if rank == 0 else None
    try:
        started, start_step = time.time(), step
        while step < opt.steps:
            set_learning_rate(filter(None, (optimizer, disc_optimizer)), opt, step)
            batch = make_batch(images, refs, opt, step, model.config.ref_size, rank)
            hr, lr, ref, gallery = (t.to(device, non_blocking=True) for t in batch)
            gen = torch.Generator().manual_seed(batch_seed(opt, step, rank))
            prior_mean = (torch.rand(len(hr), generator=gen) < opt.mean_share).to(device) & ~gallery
            torch.manual_seed(batch_seed(opt, step, rank))  # the posterior's eps
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                # Gallery references decode their mean, as `upscale --ref` does (T = 0): sampling noise on this
                # path drowned the style signal, and the decoder learnt to ignore z (measured: outputs for different
                # references differed by under one grey level).
                sr, mu, logvar = net(lr, ref, use_mean=gallery, use_prior_mean=prior_mean)
                sr = sr.float()
                sr_p, hr_p = same_crop(opt.perceptual_crop, sr, hr, generator=gen)
                losses = objective.generator_losses(sr, hr, lr, ref, gallery, prior_mean, mu, logvar, sr_p, hr_p)
            loss = objective.total(losses)
            descend(loss, optimizer, scaler, step)
            if disc is not None:
                losses["disc"] = objective.discriminator_step(disc_net, disc_optimizer, hr_p, sr_p)
            step += 1
            if rank == 0:
                def save():
                    # The training state first: --resume reads only it, so a kill between the writes loses nothing.
                    save_training_state(model, optimizer, scaler, state_path, step, opt, disc, disc_optimizer)
                    save_model(model, last, step=step)
                record(opt, log, progress, step, start_step, started, {"loss": loss.item()} | losses,
                       optimizer.param_groups[0]["lr"], opt.val and (lambda: validate(model, opt.val, device)), save)
        return model
    finally:
        end_run(log, world)


# --- the trunk stage: one fidelity trunk for every scale ---------------------------------------------------------

TRUNK_STATE_FORMAT = "refsr-trunk-training-state"


def trunk_scale(opt: TrainOptions, step: int) -> int:
    """The scale of a step's batch: the scales take turns (MDSR trains its shared body the same way)."""
    return opt.scales[step % len(opt.scales)]


def make_pixel_batch(images, opt: TrainOptions, step: int, scale: int, rank: int = 0):
    """HR crops and their PIL-bicubic LR, at `scale`."""
    rng = random.Random(batch_seed(opt, step, rank))
    pairs = [crop_and_lr(images, opt.lr_patch, scale, rng) for _ in range(opt.batch)]
    return to_tensor([np.asarray(hr) for hr, _ in pairs]), to_tensor([lr for _, lr in pairs])


def trunk_recipe(opt: TrainOptions) -> dict:
    return recipe(opt) | {"scales": list(opt.scales)}


def trunk_architecture(config: RefVAEConfig) -> dict:
    return {"channels": config.channels, "lr_blocks": config.lr_blocks, "up_channels": list(config.up_channels)}


def save_trunk_state(trunk, optimizer, path, step: int, opt: TrainOptions, config: RefVAEConfig) -> None:
    tensors = {f"model.{k}": v for k, v in trunk.state_dict().items()}
    tensors.update(_optimizer_tensors("optimizer", optimizer))
    meta = {"format": TRUNK_STATE_FORMAT, "step": str(step), "config": config.to_json(),
            "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
            "recipe": json.dumps(trunk_recipe(opt))}
    atomic_save(tensors, path, meta)


def load_trunk_state(path, opt: TrainOptions):
    """(trunk, config, optimizer state dict, step) from a file written by save_trunk_state."""
    from safetensors.torch import load_file
    meta = read_metadata(path)
    if meta.get("format") != TRUNK_STATE_FORMAT:
        raise RefsrError(f"--resume: {path} is not the state of a --stage trunk run")
    if json.loads(meta["recipe"]) != trunk_recipe(opt):
        raise RefsrError(f"--resume: {path} was trained with {json.loads(meta['recipe'])}; resume with the same "
                         "--seed, --batch, --lr-patch, --learning-rate and --scales")
    config = RefVAEConfig.from_json(meta["config"])
    tensors = load_file(str(path))
    trunk = FidelityTrunk(config.channels, config.lr_blocks, config.up_channels, opt.scales)
    trunk.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return trunk, config, _optimizer_state(tensors, "optimizer", json.loads(meta["param_groups"])), int(meta["step"])


def export_models(config: RefVAEConfig, scales, seed: int) -> dict:
    """One model per scale, built once per run, that export_trunk fills and saves: a texture branch at its initial
    state (its output layer is zero, so every z gives the trunk's output until `--stage texture` trains it)."""
    torch.manual_seed(seed)
    return {s: build_model(replace(config, arch="trunk", scale=s)) for s in scales}


def export_trunk(trunk: FidelityTrunk, model, path, step: int) -> None:
    """A checkpoint of one scale that `upscale` loads: the trunk with `model`'s scale's tail, in `model`."""
    tail = f"tails.x{model.config.scale}."
    model.trunk.load_state_dict({k: v for k, v in trunk.state_dict().items()
                                 if not k.startswith("tails.") or k.startswith(tail)})
    save_model(model, path, step=step, stage="trunk")


def init_trunk(trunk: FidelityTrunk, config: RefVAEConfig, paths) -> None:
    """Continue from trunk checkpoints (one per scale, as the trunk stage writes them): the shared body from any of
    them (they must agree), each one's tail; a scale with no checkpoint starts its tail as bicubic."""
    body = None
    for path in paths:
        model = load_checkpoint(path)
        if model.config.arch != "trunk" or trunk_architecture(model.config) != trunk_architecture(config):
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


def load_validation_crops(folder: Path, side: int) -> list:
    """Centre crops of (at most) `side` pixels, a multiple of 8, of the validation images: a trunk validation of
    every scale costs seconds, not the minutes of whole 2k photos at x2."""
    crops = []
    for image in load_training_images([folder], 8):
        h, w = image.shape[:2]
        side = min(side, h, w) // 8 * 8
        y, x = (h - side) // 2, (w - side) // 2
        crops.append(np.ascontiguousarray(image[y:y + side, x:x + side]))
    return crops


@torch.no_grad()
def validate_trunk(trunk, crops, scales, device) -> dict:
    """PSNR-Y (border of `scale` pixels shaved) of the trunk and of bicubic on the validation crops."""
    trunk.eval()
    measures = {}
    for scale in scales:
        ours, bicubic = [], []
        for crop in crops:
            hr = Image.fromarray(crop)
            lr = hr.resize((hr.width // scale, hr.height // scale), Image.BICUBIC)
            sr = trunk(to_tensor([np.asarray(lr)]).to(device), scale).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
            hr_f = crop.astype(np.float64) / 255
            ours.append(psnr_y(np.round(sr.astype(np.float64) * 255) / 255, hr_f, scale))
            bicubic.append(psnr_y(np.asarray(lr.resize(hr.size, Image.BICUBIC), dtype=np.float64) / 255, hr_f, scale))
        measures[f"val_psnr_x{scale}"] = float(np.mean(ours))
        measures[f"val_bicubic_x{scale}"] = float(np.mean(bicubic))
    trunk.train()
    return measures


def fit_trunk(opt: TrainOptions, progress=None) -> FidelityTrunk:
    """The trunk stage: pixel L1 and LR-consistency L1, the scales taking turns. Writes `x{scale}.safetensors` for
    every scale (loadable by upscale, and by `--stage texture --init`), `last.state.safetensors` and log.jsonl."""
    rank, world, device = start_distributed(torch.device(opt.device))
    cuda = device.type == "cuda"
    state_path = opt.out / "last.state.safetensors"
    if rank == 0:
        opt.out.mkdir(parents=True, exist_ok=True)
    if resuming(opt, state_path):
        trunk, config, optimizer_state, step = load_trunk_state(state_path, opt)
    else:
        torch.manual_seed(opt.seed)
        config, optimizer_state, step = replace(opt.config, arch="trunk"), None, 0
        trunk = FidelityTrunk(config.channels, config.lr_blocks, config.up_channels, opt.scales)
        init_trunk(trunk, config, opt.init or [])
    trunk.to(device).train()
    if cuda:  # channels-last is cuDNN's layout; on this CPU it makes a training step 10 % slower (bench/train_step.py)
        trunk.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(trunk.parameters(), lr=opt.learning_rate, betas=(0.9, 0.99))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    net = trunk
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(trunk, device_ids=[device.index] if cuda else None)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    images = load_training_images(opt.data, opt.lr_patch * max(opt.scales))
    crops = load_validation_crops(opt.val, 480) if opt.val is not None and rank == 0 else None
    exports = export_models(config, opt.scales, opt.seed) if rank == 0 else None
    log = open_log(opt.out / "log.jsonl", step, resumed=opt.resume) if rank == 0 else None
    try:
        started, start_step = time.time(), step
        while step < opt.steps:
            set_learning_rate([optimizer], opt, step)
            scale = trunk_scale(opt, step)
            hr, lr = (t.to(device, non_blocking=True) for t in make_pixel_batch(images, opt, step, scale, rank))
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                sr = net(lr.contiguous(memory_format=torch.channels_last) if cuda else lr, scale).float()
            losses = {"l1": F.l1_loss(sr, hr), "lr_cons": F.l1_loss(downscale(sr, scale), lr)}
            loss = opt.l1_weight * losses["l1"] + opt.lr_consistency_weight * losses["lr_cons"]
            descend(loss, optimizer, scaler, step)
            step += 1
            if rank == 0:
                def save():
                    save_trunk_state(trunk, optimizer, state_path, step, opt, config)
                    for s, model in exports.items():
                        export_trunk(trunk, model, opt.out / f"x{s}.safetensors", step)
                record(opt, log, progress, step, start_step, started, {"scale": scale, "loss": loss.item()} | losses,
                       optimizer.param_groups[0]["lr"], crops and (lambda: validate_trunk(trunk, crops, opt.scales,
                                                                                          device)), save)
        return trunk
    finally:
        end_run(log, world)


def end_run(log, world: int) -> None:
    """Close rank 0's log and, under torchrun, the process group: also when the run stops on an error."""
    if log is not None:
        log.close()
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


def descend(loss, optimizer, scaler, step: int) -> None:
    """One optimizer step on `loss` (through the AMP loss scaler, a no-op off CUDA); a non-finite loss stops the run."""
    if not torch.isfinite(loss):
        raise RefsrError(f"step {step}: the loss is {loss.item()}; lower --learning-rate or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def record(opt: TrainOptions, log, progress, step: int, start_step: int, started: float, measures: dict,
           learning_rate: float, validate_now, save) -> None:
    """Rank 0's bookkeeping after a step: a log row every log_every steps, validation (`validate_now()`, unless
    None) every val_every, `save()` every save_every, and the progress callback."""
    measures = {k: v.item() if torch.is_tensor(v) else v for k, v in measures.items()}
    row = {}
    if step % opt.log_every == 0 or step == opt.steps:
        row = {"step": step, **measures, "learning_rate": learning_rate, "seconds": round(time.time() - started, 1)}
    if validate_now and (step % opt.val_every == 0 or step == opt.steps):
        row = {"step": step, **row, **validate_now()}
    if row:
        log.write(json.dumps(row) + "\n")
        log.flush()
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
    """log.jsonl for appending; on resume, the rows after the checkpoint's step are dropped (they are redone)."""
    if resumed and path.exists():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
    return open(path, "a")
