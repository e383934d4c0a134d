"""The published RefVAE graph (Liu et al.), built here only to time refsr's graph against it (bench/speed.py);
nothing loads weights into it, and refsr itself never builds it.

Frozen VGG16 to relu4_1 on the *bicubic-upsampled* LR (features at 1/8 of the output size, 512 wide); the released
code's CVAE head (1x1 + 3x3 convs, resize to 16x16, flatten, linear) and feature decoder (linear to 16x16, resized to
the feature map, conv + residual block); image decoder of three bilinear x2 stages (512 -> 256 -> 128 -> 64) and a
final conv, added to bicubic. It has the methods refsr's Upscaler calls, so it runs through the same tiling,
back-projection and output code. Its condition map is stretched over whatever it decodes, so its tiled output is not
its untiled one.
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from refsr_cli.model import ResBlock, VGG16Features


@dataclass(frozen=True)
class PaperConfig:
    scale: int = 8
    channels: int = 512
    up_channels: tuple = (256, 128, 64)
    z_dim: int = 256
    ref_size: int = 256
    head_channels: int = 64
    head_grid: int = 16
    cond_grid: int = 16
    texture_noise: bool = False  # what the Upscaler asks of a config
    stages: int = 3


class PaperRefVAE(nn.Module):
    def __init__(self, config: PaperConfig = PaperConfig()):
        super().__init__()
        self.config = c = config
        self.vgg = VGG16Features()
        self.ref_reduce = nn.Sequential(
            nn.Conv2d(512, c.head_channels, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c.head_channels, c.head_channels, 3, padding=1), nn.LeakyReLU(0.2))
        self.ref_to_posterior = nn.Linear(c.head_channels * c.head_grid ** 2, 2 * c.z_dim)
        self.lr_to_modulation = nn.Sequential(
            nn.Conv2d(512, c.channels, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c.channels, 2 * c.channels, 3, padding=1))
        self.z_to_cond = nn.Linear(c.z_dim, c.head_channels * c.cond_grid ** 2)
        self.cond_body = nn.Sequential(
            nn.Conv2d(c.head_channels, c.channels, 3, padding=1), nn.LeakyReLU(0.2), ResBlock(c.channels))
        stages, cin = [], c.channels
        for cout in c.up_channels:
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2)]
            cin = cout
        self.upsample = nn.Sequential(*stages)
        self.to_rgb = nn.Conv2d(cin, 3, 3, padding=1)

    def encode_reference(self, ref):
        g = self.config.head_grid
        feats = F.adaptive_avg_pool2d(self.ref_reduce(self.vgg(ref)), (g, g)).flatten(1)
        mu, logvar = self.ref_to_posterior(feats).chunk(2, dim=1)
        return mu, logvar

    def encode_lr(self, lr):
        up = F.interpolate(lr, scale_factor=self.config.scale, mode="bicubic", align_corners=False)
        return self.lr_to_modulation(self.vgg(up)).chunk(2, dim=1)

    def condition_cell(self, z, noise=None):
        """(cell, styles, noise), the shape of refsr's conditions, which the Upscaler batches: this graph has neither
        styles nor noise."""
        c = self.config
        return self.z_to_cond(z).view(-1, c.head_channels, c.cond_grid, c.cond_grid), None, None

    def decode(self, lr, lr_code, condition, origin=(0, 0)):
        f_mu, f_sigma = lr_code
        cell = condition[0]
        cond = self.cond_body(F.interpolate(cell, size=f_mu.shape[-2:], mode="bilinear", align_corners=False))
        residual = self.to_rgb(self.upsample(cond * (1 + f_sigma) + f_mu))
        base = F.interpolate(lr, scale_factor=self.config.scale, mode="bicubic", align_corners=False)
        return base + F.interpolate(residual, size=base.shape[-2:], mode="bilinear", align_corners=False)
