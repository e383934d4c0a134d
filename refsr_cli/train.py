"""`refsr train`: trains the very RefVAE module that inference loads, and writes checkpoints it loads directly.

A run folder holds `last.safetensors` (the model, loadable by `upscale --weights`), `last.state.safetensors` (model
and optimizer, for --resume) and `log.jsonl` (one line of losses per logged step). Batches are drawn from a generator
seeded by (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import atomic_save, build_model, load_backbone, load_checkpoint, read_metadata, save_model
from .errors import RefsrError
from .images import list_images, read_rgb
from .metrics import LPIPSAlex
from .model import RefVAEConfig, VGG16Features, downscale, kl_divergence


@dataclass
class TrainOptions:
    data: list
    out: Path
    refs: list | None = None
    scale: int = 8
    steps: int = 2000
    batch: int = 8
    lr_patch: int = 32
    learning_rate: float = 2e-4
    l1_weight: float = 1.0
    lr_consistency_weight: float = 1.0
    kl_weight: float = 1e-4
    lpips_weight: float = 0.1
    style_weight: float = 0.05  # on raw VGG16 activations, whose stats are ~100x the paper's normalised ones
    ref_mix: float = 0.5  # share of each batch that takes a gallery reference (only with refs)
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    init: Path | None = None
    device: str = "cpu"
    config: RefVAEConfig = RefVAEConfig()  # the architecture of a fresh run (--resume and --init bring their own)


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


def make_batch(images, refs, opt: TrainOptions, step: int, ref_size: int):
    """HR crops, their PIL-bicubic LR, and the reference of each sample (the HR crop itself, or from the gallery)."""
    rng = random.Random(opt.seed * 1_000_003 + step)
    hr_size = opt.lr_patch * opt.scale
    hr, lr, ref, from_gallery = [], [], [], []
    for _ in range(opt.batch):
        crop = random_crop(images[rng.randrange(len(images))], hr_size, rng)
        pil = Image.fromarray(np.ascontiguousarray(crop))
        hr.append(crop)
        lr.append(np.asarray(pil.resize((opt.lr_patch,) * 2, Image.BICUBIC)))
        gallery = bool(refs) and rng.random() < opt.ref_mix
        source = Image.fromarray(refs[rng.randrange(len(refs))]) if gallery else pil
        ref.append(np.asarray(source.resize((ref_size,) * 2, Image.BICUBIC)))
        from_gallery.append(gallery)
    return to_tensor(hr), to_tensor(lr), to_tensor(ref), torch.tensor(from_gallery)


def style_loss(vgg: VGG16Features, sr, ref):
    """L1 between channel means and standard deviations of VGG16 features (relu1_2 .. relu4_1), with the SR
    image resized to the reference's size (the size the reference encoder sees; 4x cheaper than 256 px)."""
    sr = F.interpolate(sr, size=ref.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    loss = 0
    for a, b in zip(vgg(sr, all_layers=True), vgg(ref, all_layers=True)):
        loss = loss + F.l1_loss(a.mean((2, 3)), b.mean((2, 3))) + F.l1_loss(a.std((2, 3)), b.std((2, 3)))
    return loss


STATE_FORMAT = "refsr-training-state"


def save_training_state(model, optimizer, scaler, path, step: int, opt: TrainOptions) -> None:
    """Model, optimizer and loss scaler in one file, so that they can never be from different steps."""
    sd = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    tensors.update({f"optimizer.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)})
    atomic_save(tensors, path, {"format": STATE_FORMAT, "step": str(step), "config": model.config.to_json(),
                                "param_groups": json.dumps(sd["param_groups"]), "scaler": json.dumps(scaler.state_dict()),
                                "recipe": json.dumps(recipe(opt))})


def recipe(opt: TrainOptions) -> dict:
    """The options a resumed run must share with the run it continues (--steps may grow)."""
    return {k: getattr(opt, k) for k in ("seed", "batch", "lr_patch", "learning_rate", "scale")}


def load_training_state(path, opt: TrainOptions):
    """(model, optimizer state dict, scaler state dict, step) from a file written by save_training_state."""
    from safetensors.torch import load_file
    model = load_checkpoint(path, opt.scale, fmt=STATE_FORMAT, prefix="model.").train()
    meta = read_metadata(path)
    if json.loads(meta["recipe"]) != recipe(opt):
        raise RefsrError(f"--resume: {path} was trained with {json.loads(meta['recipe'])}; resume with the same "
                         "--seed, --batch, --lr-patch, --learning-rate and --scale")
    state = {}
    for key, value in load_file(str(path)).items():
        if key.startswith("optimizer."):
            i, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    optimizer_state = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return model, optimizer_state, json.loads(meta["scaler"]), int(meta["step"])


def train(opt: TrainOptions, progress=None) -> Path:
    device = torch.device(opt.device)
    cuda = device.type == "cuda"
    opt.out.mkdir(parents=True, exist_ok=True)
    last, state_path = opt.out / "last.safetensors", opt.out / "last.state.safetensors"
    for stale in opt.out.glob(".last.*.tmp"):  # left by a run killed (SIGKILL) in the middle of a save
        stale.unlink()

    resumed = None
    if opt.resume:
        if not state_path.is_file():
            raise RefsrError(f"--resume: no checkpoint to resume in {opt.out}")
        model, *resumed = load_training_state(state_path, opt)
    elif state_path.exists():
        raise RefsrError(f"{opt.out} holds a run already: --resume it, or give another --out")
    elif opt.init is not None:
        model = load_checkpoint(opt.init, opt.scale)
    else:
        torch.manual_seed(opt.seed)  # the same seed, the same initial weights
        model = build_model(replace(opt.config, scale=opt.scale))
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    params = [p for n, p in model.named_parameters() if not n.startswith("vgg.")]
    optimizer = torch.optim.Adam(params, lr=opt.learning_rate, betas=(0.9, 0.99))
    step = 0
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    if resumed is not None:
        optimizer_state, scaler_state, step = resumed
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(scaler_state)

    lpips = None
    if opt.lpips_weight > 0:
        lpips = LPIPSAlex()
        load_backbone(lpips, "lpips_alex")
        lpips.to(device)
    images = load_training_images(opt.data, opt.lr_patch * opt.scale)
    refs = load_training_images(opt.refs, 1) if opt.refs else None
    log_path = opt.out / "log.jsonl"
    if resumed is not None and log_path.exists():  # drop the rows of steps after the checkpoint: they are redone
        rows = [r for r in log_path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        log_path.write_text("".join(r + "\n" for r in rows))
    with open(log_path, "a") as log:
        started, start_step = time.time(), step
        while step < opt.steps:
            # Cosine decay over the whole run, so that resuming a run lands on the same schedule.
            for group in optimizer.param_groups:
                group["lr"] = opt.learning_rate * (0.55 + 0.45 * math.cos(math.pi * step / opt.steps))
            batch = make_batch(images, refs, opt, step, model.config.ref_size)
            hr, lr, ref, gallery = (t.to(device, non_blocking=True) for t in batch)
            torch.manual_seed(opt.seed * 1_000_003 + step)  # the posterior's eps
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                # Gallery references decode their mean, as `upscale --ref` does (T = 0): sampling noise on this
                # path drowned the style signal, and the decoder learnt to ignore z (measured: outputs for different
                # references differed by under one grey level).
                sr, mu, logvar = model(lr, ref, use_mean=gallery)
                sr = sr.float()
                losses = {
                    "l1": F.l1_loss(sr, hr),
                    "lr_cons": F.l1_loss(downscale(sr, opt.scale), lr),
                    "kl": kl_divergence(mu.float(), logvar.float()),
                }
                if lpips is not None:
                    losses["lpips"] = lpips(sr, hr).mean()
                if gallery.any():
                    losses["style"] = style_loss(model.vgg, sr[gallery], ref[gallery])
            weights = {"l1": opt.l1_weight, "lr_cons": opt.lr_consistency_weight, "kl": opt.kl_weight,
                       "lpips": opt.lpips_weight, "style": opt.style_weight}
            loss = sum(weights[k] * v for k, v in losses.items())
            if not torch.isfinite(loss):
                raise RefsrError(f"step {step}: the loss is {loss.item()}; lower --learning-rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1

            if step % opt.log_every == 0 or step == opt.steps:
                row = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                       "learning_rate": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 1)}
                log.write(json.dumps(row) + "\n")
                log.flush()
            if step % opt.save_every == 0 or step == opt.steps:
                # The training state first: --resume reads only it, so a kill between the two writes loses nothing.
                save_training_state(model, optimizer, scaler, state_path, step, opt)
                save_model(model, last, step=step)
            if progress is not None:
                progress(step, opt.steps, {k: v.item() for k, v in losses.items()},
                         (step - start_step) / max(time.time() - started, 1e-9))
        return last
