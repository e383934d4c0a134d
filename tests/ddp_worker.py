"""One rank of the torchrun test (tests/test_train.py): trains a tiny model for a few steps under torchrun and saves
the parameters this rank ends with."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from conftest import tiny_config
from refsr_cli.options import TrainOptions
from refsr_cli.train import fit

photos, out = Path(sys.argv[1]), Path(sys.argv[2])
opt = TrainOptions(data=[photos], out=out / "run", scale=2, steps=3, batch=2, lr_patch=16, log_every=1,
                   config=tiny_config(2), learning_rate=1e-3, imle_samples=2, adv_weight=0.1, perceptual_crop=32,
                   pool_size=4, device="cpu")
model = fit(opt)
save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()},
          str(out / f"rank{os.environ['RANK']}.safetensors"))
