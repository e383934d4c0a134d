"""`refsr eval`: a checkpoint measured by the protocol of DESIGN.md §5, next to the bicubic baseline.

HR is cropped to a multiple of the scale, LR is its PIL-bicubic downscale; PSNR and SSIM on Y with `scale` pixels of
border shaved, LPIPS (AlexNet, v0.1) on RGB, LR-PSNR of the SR image downscaled the same way.
"""
import numpy as np
import torch
from PIL import Image

from .checkpoint import load_backbone
from .errors import RefsrError
from .images import MIN_SIDE, list_images, read_rgb
from .metrics import LPIPSAlex, bicubic_resize, modcrop, psnr, psnr_y, ssim_y, to_float


def measure(sr: Image.Image, hr: Image.Image, lr: Image.Image, scale: int, lpips: LPIPSAlex) -> dict:
    sr_f, hr_f = to_float(sr), to_float(hr)
    with torch.inference_mode():
        as_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()
        lpips_value = lpips(as_tensor(sr_f), as_tensor(hr_f)).item()
    return {
        "psnr": psnr_y(sr_f, hr_f, scale),
        "ssim": ssim_y(sr_f, hr_f, scale),
        "lpips": lpips_value,
        "lr_psnr": psnr(to_float(bicubic_resize(sr, lr.size)), to_float(lr)),
    }


def evaluate(hr_dir, upscaler, scale: int, z_for, on_image=None) -> dict:
    """Rows of {image, method, psnr, ssim, lpips, lr_psnr} for bicubic and the model, and their means.
    `z_for()` gives the z to decode each LR image with."""
    lpips = LPIPSAlex()
    load_backbone(lpips, "lpips_alex")
    rows = []
    for path in list_images(hr_dir):
        rgb = read_rgb(path)
        if min(rgb.shape[:2]) < MIN_SIDE * scale:
            raise RefsrError(f"{path}: too small to evaluate at x{scale}")
        hr = modcrop(Image.fromarray((rgb * 255).round().astype(np.uint8)), scale)
        lr = bicubic_resize(hr, (hr.width // scale, hr.height // scale))
        bicubic = bicubic_resize(lr, hr.size)
        lr_array = np.asarray(lr, dtype=np.float32) / 255
        sr = Image.fromarray(upscaler.upscale(lr_array, [z_for()])[0])
        for method, image in (("bicubic", bicubic), ("refsr", sr)):
            rows.append({"image": path.name, "method": method, **measure(image, hr, lr, scale, lpips)})
        if on_image is not None:
            on_image(path.name)
    means = {}
    for method in ("bicubic", "refsr"):
        mine = [r for r in rows if r["method"] == method]
        means[method] = {k: float(np.mean([r[k] for r in mine])) for k in ("psnr", "ssim", "lpips", "lr_psnr")}
    return {"rows": rows, "means": means}
