"""The training objective's terms (training only: inference never imports this module).

Each term is a plain function or a small module; `train.py` weights and sums them. The VGG16 here is the frozen
ImageNet network the model's reference encoder uses, so training loads no second copy.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import VGG16Features, downscale


def feature_distance(vgg: VGG16Features, x, target: list):
    """Per-sample distance of images x (B, 3, H, W) to images whose VGG16 features are `target` (what
    `vgg(y, all_layers=True)` returns, computed once for every x compared with y): L1 between the features relu1_2,
    relu2_2, relu3_3 and relu4_1, each layer's L1 divided by the mean magnitude of the target's features there (over
    all the targets of the call: callers compare the samples of a crop within one call), so that the four layers
    weigh alike. The IMLE selection and the loss of the chosen sample use it; it is not LPIPS
    (the metric refsr reports), which a loss would stop measuring."""
    distance = 0
    for a, b in zip(vgg(x, all_layers=True), target):
        distance = distance + (a - b).abs().mean((1, 2, 3)) / b.abs().mean().detach().clamp_min(1e-6)
    return distance


def feature_stats_loss(vgg: VGG16Features, x, ref, x_mask=None, ref_mask=None):
    """Style: L1 between channel means and standard deviations of VGG16 features (relu1_2 .. relu4_1), with `x`
    resized to the reference's size (the size the reference encoder sees).

    With masks ((B, 1, H, W) of x and of ref, 1 where a pixel counts; None: every pixel), the statistics are taken
    over each image's masked pixels alone, each mask resized to every layer: e.g. the textured parts of the output
    against the textured parts of the reference. An output or reference with under a twentieth of its pixels masked
    in adds nothing (a flat crop has no texture to take a look from)."""
    x = F.interpolate(x, size=ref.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    x_mask = torch.ones_like(x[:, :1]) if x_mask is None else F.interpolate(x_mask, size=ref.shape[-2:], mode="area")
    ref_mask = torch.ones_like(ref[:, :1]) if ref_mask is None else ref_mask
    counted = ((x_mask.mean((1, 2, 3)) >= 0.05) & (ref_mask.mean((1, 2, 3)) >= 0.05)).to(x.dtype)
    per_image = 0
    for a, b in zip(vgg(x, all_layers=True), vgg(ref, all_layers=True)):
        (a_mean, a_std), (b_mean, b_std) = masked_stats(a, x_mask), masked_stats(b, ref_mask)
        per_image = per_image + (a_mean - b_mean).abs().mean(1) + (a_std - b_std).abs().mean(1)
    return (per_image * counted).sum() / counted.sum().clamp_min(1)


def away_from_border(mask, margin: int):
    """`mask` (B, 1, H, W) with its outer `margin` pixels set to 0."""
    inner = torch.zeros_like(mask)
    inner[..., margin:mask.shape[-2] - margin, margin:mask.shape[-1] - margin] = 1  # margin 0: all of it
    return mask * inner


def masked_stats(features, mask):
    """Channel means and standard deviations (B, C) of `features` over the pixels where `mask` (B, 1, H, W, at any
    size: area-resized to the features') is 1, weighted by it."""
    weight = F.interpolate(mask, size=features.shape[-2:], mode="area")
    weight = weight / weight.sum((2, 3), keepdim=True).clamp_min(1e-6)
    mean = (features * weight).sum((2, 3))
    variance = ((features - mean[..., None, None]).pow(2) * weight).sum((2, 3))
    return mean, (variance + 1e-8).sqrt()


def lr_consistency(sr, lr, scale: int):
    """L1 between the output's bicubic downscale and the LR input."""
    return F.l1_loss(downscale(sr, scale), lr)


def fine_detail(x, radius: int = 2):
    """The image minus its box blur over (2 * radius + 1)² pixels: the detail a texture branch adds."""
    return x - F.avg_pool2d(F.pad(x, [radius] * 4, mode="replicate"), 2 * radius + 1, stride=1)


def flat_mask(hr, threshold: float = 0.01, radius: int = 4):
    """1 where the HR image is flat: the mean absolute fine detail over a (2 * radius + 1)² neighbourhood, over the
    channels, is under `threshold` (2.5 grey levels); (B, 1, H, W)."""
    energy = F.avg_pool2d(F.pad(fine_detail(hr).abs().mean(1, keepdim=True), [radius] * 4, mode="replicate"),
                          2 * radius + 1, stride=1)
    return (energy < threshold).to(hr.dtype)


def detail_on_flats(x, mask):
    """Mean absolute fine detail of outputs x (B, 3, H, W) where `mask` (B, 1, H, W, of their HR crops) is 1:
    grain drawn where the photo is flat, which back-projection cannot remove and no HR crop asks for."""
    return (fine_detail(x).abs() * mask).sum() / (mask.sum() * x.shape[1]).clamp_min(1)


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)), summed over z and averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN of pix2pix (Isola et al. 2017), instance-normalised: one real/fake logit per patch."""

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


def generator_adversarial(disc: PatchDiscriminator, fake):
    """-log D(G(x)), the non-saturating form, with the discriminator frozen: the generator's step must not give it
    gradients."""
    disc.requires_grad_(False)
    loss = F.softplus(-disc(fake)).mean()
    disc.requires_grad_(True)
    return loss


def discriminator_loss(disc, real, fake):
    """The discriminator's loss on real and (detached) fake windows, in one call: instance norm keeps the samples
    apart. In float32 even on CUDA: it is small, and needs no loss scaler then."""
    logits = disc(torch.cat([real, fake.detach()]).float())
    real_logits, fake_logits = logits[:len(real)], logits[len(real):]  # there may be more fakes than reals
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
