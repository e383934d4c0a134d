"""Extend a checkpoint trained before z_modulation existed with a zero-initialised z_to_style layer.

    python scripts/add_z_modulation.py old.safetensors new.safetensors

The new layer starts at zero, so the extended model computes exactly what the old one did; training then goes on
with `refsr train --init new.safetensors`. Used once, between stages 1 and 2 of the release x8 weights
(weights/README.md).
"""
import json
import sys

from safetensors import safe_open
from safetensors.torch import load_file

from refsr_cli.checkpoint import build_model, save_model
from refsr_cli.model import RefVAEConfig


def main(src: str, dst: str) -> None:
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["z_modulation"] = True
    model = build_model(RefVAEConfig(**config))
    missing, unexpected = model.load_state_dict(load_file(src), strict=False)
    added = [k for k in missing if not k.startswith("vgg.")]
    assert added == ["z_to_style.weight", "z_to_style.bias"] and not unexpected, (added, unexpected)
    save_model(model, dst, step=meta.get("step"), note="extended with a zero-initialised z_to_style")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
