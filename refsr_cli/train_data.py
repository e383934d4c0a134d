"""Training data: HR photos in memory, random crops with their PIL-bicubic LR, and for the texture stage a pool of
crops with what the frozen trunk makes of them.

Every random choice is drawn from a generator seeded by (what is drawn, seed, its index, rank), never from a global
one, so a resumed run sees exactly the data the uninterrupted run would have seen.
"""
import math
import random

import numpy as np
import torch
from PIL import Image

from .errors import OutOfMemory, RefsrError, memory_named
from .images import read_rgb, source_images


def load_training_images(folders, min_side: int) -> list:
    """uint8 HxWx3 arrays of the images in `folders` whose short side is at least `min_side`."""
    paths = [p for folder in folders for p in source_images(folder)]
    if not paths:
        raise RefsrError(f"no images found in {', '.join(map(str, folders))}")
    images = []
    for p in paths:
        try:
            with memory_named(str(p)):
                rgb = read_rgb(p)
                if min(rgb.shape[:2]) >= min_side:
                    images.append((rgb * 255).round().astype(np.uint8))
        except OutOfMemory as e:  # not a training step's: a plain RefsrError, or train would say "lower --batch"
            raise RefsrError(f"{e}; training holds its images in memory: give smaller ones") from None
    if not images:
        raise RefsrError(f"no image of {', '.join(map(str, folders))} is at least {min_side} px on its short side")
    return images


def seeded(stream: str, seed: int, index: int, rank: int = 0) -> random.Random:
    """The generator of draw `index` of `stream` ("step", "fill": a pool's crop) of a run of `seed` on `rank`."""
    return random.Random(f"{stream} {seed} {index} {rank}")


def random_crop(img: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
    crop = img[y:y + size, x:x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.rot90(crop, rng.randrange(4))


def to_tensor(arrays) -> torch.Tensor:
    """uint8 HxWxC arrays -> (N, C, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrays])).permute(0, 3, 1, 2).float() / 255


def crop_and_lr(image: np.ndarray, lr_patch: int, scale: int, rng: random.Random):
    """A random HR crop of `image` and its PIL-bicubic LR (the evaluation's degradation, uint8 quantisation
    included), as uint8 arrays."""
    pil = Image.fromarray(np.ascontiguousarray(random_crop(image, lr_patch * scale, rng)))
    return np.asarray(pil), np.asarray(pil.resize((lr_patch,) * 2, Image.BICUBIC))


def pixel_batch(images, batch: int, lr_patch: int, scale: int, rng: random.Random):
    """`batch` HR crops of random images and their LR, as tensors: the trunk stage's batch."""
    pairs = [crop_and_lr(images[rng.randrange(len(images))], lr_patch, scale, rng) for _ in range(batch)]
    return to_tensor([hr for hr, _ in pairs]), to_tensor([lr for _, lr in pairs])


def resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BICUBIC))


class CropPool:
    """The texture stage's crops, each with the frozen trunk's features and output computed once and used for
    about `uses` batches: the trunk's forward pass then costs a step 1/uses of what it did.

    The pool holds fills F - size .. F - 1, where F = size + step * refill and fill f sits in slot f % size and is
    drawn from seeded("fill", seed, f, rank): the pool at any step is a function of the step, so a resumed run
    rebuilds it.
    Each crop also remembers its photo, which gives its reference (another crop of the same photo).
    """

    def __init__(self, images, trunk_outputs, *, lr_patch: int, scale: int, size: int, uses: int, seed: int,
                 rank: int, device):
        self.images, self.trunk_outputs = images, trunk_outputs
        self.lr_patch, self.scale, self.size, self.seed, self.rank = lr_patch, scale, size, seed, rank
        self.device = torch.device(device)
        self.uses, self.fills = uses, None
        self.hr = self.lr = self.features = self.fidelity = None
        self.photo = [0] * size

    FIRST_FILL_CHUNK = 16  # crops a trunk pass of the first fill (bounded memory)

    def advance(self, step: int, batch: int) -> None:
        """Bring the pool to `step`: fill what is missing (all of it at the first call), about batch/uses crops
        a step after that. The trunk runs on the crops in the groups the uninterrupted run gave it (the first fill
        in chunks, then each step's refill), so that a resumed run computes the same features to the last bit."""
        refill = math.ceil(batch / self.uses)
        end = self.size + step * refill
        wanted = range(end - self.size, end)
        new = [f for f in wanted if self.fills is None or f not in self.fills]
        groups = {}  # the whole group each new fill came in, first fill chunk or step, by its first fill
        for f in new:
            if f < self.size:
                start = f // self.FIRST_FILL_CHUNK * self.FIRST_FILL_CHUNK
                group = range(start, min(start + self.FIRST_FILL_CHUNK, self.size))
            else:
                start = self.size + (f - self.size) // refill * refill
                group = range(start, start + refill)
            groups[start] = group
        for group in groups.values():
            self._fill(group, keep=set(new))
        self.fills = wanted

    def _fill(self, group, keep: set) -> None:
        """Crops of the fills of `group` through the trunk together; those in `keep` stored in their slots."""
        crops = []
        for f in group:
            rng = seeded("fill", self.seed, f, self.rank)
            photo = rng.randrange(len(self.images))
            crops.append((f % self.size, photo, *crop_and_lr(self.images[photo], self.lr_patch, self.scale, rng)))
        hr = to_tensor([c[2] for c in crops]).to(self.device)
        lr = to_tensor([c[3] for c in crops]).to(self.device)
        features, fidelity = self.trunk_outputs(lr)
        kept = [i for i, f in enumerate(group) if f in keep]
        crops = [crops[i] for i in kept]
        hr, lr, features, fidelity = (t[kept] for t in (hr, lr, features, fidelity))
        if self.hr is None:
            self.hr = torch.empty(self.size, *hr.shape[1:], device=self.device)
            self.lr = torch.empty(self.size, *lr.shape[1:], device=self.device)
            self.features = torch.empty(self.size, *features.shape[1:], device=self.device)
            self.fidelity = torch.empty(self.size, *fidelity.shape[1:], device=self.device)
        slots = torch.tensor([c[0] for c in crops], device=self.device)
        self.hr[slots], self.lr[slots], self.features[slots], self.fidelity[slots] = hr, lr, features, fidelity
        for slot, photo, *_ in crops:
            self.photo[slot] = photo

    def draw(self, batch: int, rng: random.Random):
        """`batch` distinct slots: (slots, hr, lr, features, fidelity)."""
        slots = rng.sample(range(self.size), batch)
        index = torch.tensor(slots, device=self.device)
        return slots, self.hr[index], self.lr[index], self.features[index], self.fidelity[index]

    def reference(self, slot: int, ref_size: int, rng: random.Random) -> np.ndarray:
        """Another random crop of the photo of `slot`, of the crop's size, resized to `ref_size`: what the
        reference encoder sees in place of a user's reference (RefVAE's code shows it the HR target itself; another
        crop keeps z from carrying the target's exact layout)."""
        image = self.images[self.photo[slot]]
        side = min(self.lr_patch * self.scale, *image.shape[:2])
        return resized(random_crop(image, side, rng), ref_size)
