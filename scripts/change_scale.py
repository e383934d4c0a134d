"""Start a checkpoint of another scale from a trained one: everything but the last x2 stages carries over.

    python scripts/change_scale.py refsr-x8.safetensors 4 x4-init.safetensors

The LR encoder, the reference head, the condition decoder and the first x2 stages do not depend on the scale, so
they are copied; the z modulation keeps the rows of the stages that remain; `to_rgb`, which would now read the
features of another stage, starts at zero, so the new model starts as bicubic, as a fresh one does. Training then
goes on with `refsr train --scale 4 --init x4-init.safetensors`. Used once, to start the release x4 weights from the
x8 ones (weights/README.md).
"""
import sys
from dataclasses import replace

from safetensors.torch import load_file

from refsr_cli.checkpoint import build_model, read_config, save_model


def main(src: str, scale: str, dst: str) -> None:
    config = read_config(src)
    if config.arch != "lean":
        sys.exit("only lean checkpoints change scale")
    model = build_model(replace(config, scale=int(scale)))
    new = model.trainable_state_dict()
    copied = {}
    for name, tensor in load_file(src).items():
        target = new.get(name)
        if target is None or name.startswith("to_rgb."):
            continue  # a stage the new scale does not have; an output layer that would read another stage
        if name.startswith("z_to_style.") and tensor.shape[0] > target.shape[0]:
            tensor = tensor[:target.shape[0]]  # per-stage (scale, shift) rows, first stage first
        if tensor.shape == target.shape:
            copied[name] = tensor
    fresh = sorted(set(new) - set(copied))
    model.load_state_dict(copied, strict=False)
    save_model(model, dst, note=f"x{config.scale} {src} carried over to x{scale}; fresh: {', '.join(fresh)}")
    print(f"copied {len(copied)} tensors, fresh: {', '.join(fresh) or 'none'}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
