"""Image losses and metrics: L1, SSIM, PSNR, and LPIPS where real backbone weights exist."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         weight: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
    """SSIM (Wang et al. 2004; Gaussian 11×11 window, σ 1.5) of images [..., H, W, C] in [0, 1].

    Like scikit-image's ``structural_similarity(gaussian_weights=True)``, only windows that fit
    inside the image count (a border of ``window // 2`` pixels is left out).

    The window is separable, so it runs as two 1-D passes (≈5× fewer operations than 11×11).
    ``weight`` [..., H, W] averages the SSIM map with those weights. ``reduce=False`` returns one
    value per image ([...]) instead of the mean over all of them.
    """
    shape = a.shape
    c = shape[-1]
    x = a.reshape(-1, *shape[-3:]).permute(0, 3, 1, 2)
    y = b.reshape(-1, *shape[-3:]).permute(0, 3, 1, 2)
    g = _gaussian_1d(window, sigma, a.dtype).to(a.device)
    gx = g.reshape(1, 1, 1, window).expand(5 * c, 1, 1, window)
    gy = g.reshape(1, 1, window, 1).expand(5 * c, 1, window, 1)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # one blur pass for all five moments
    blurred = F.conv2d(F.conv2d(stack, gx, groups=5 * c), gy, groups=5 * c)
    mu_x, mu_y, exx, eyy, exy = blurred.split(c, dim=1)
    sxx, syy, sxy = exx - mu_x**2, eyy - mu_y**2, exy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    s = s.mean(dim=1)  # over channels → [M, H, W]
    r = window // 2
    w = torch.ones_like(s) if weight is None else weight.reshape(-1, *shape[-3:-1])[:, r:-r, r:-r].to(s)
    per_image = (s * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-8)
    return per_image.mean() if reduce else per_image.reshape(shape[:-3])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] (over all given pixels)."""
    mse = torch.mean((a - b) ** 2)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def load_lpips(net: str = "vgg"):
    """LPIPS with its pretrained backbone. The backbone comes from torchvision's model hub, so this
    needs network access or a filled torch hub cache; without one it raises (never a random net)."""
    import lpips

    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # noqa: BLE001 - any download/cache failure means no real weights
        raise RuntimeError(f"LPIPS needs pretrained {net} weights from the torch hub: {e}. "
                           "Set train.lambda_lpips=0 (the cpu presets do) or fill the hub cache.") from e
    return model.eval().requires_grad_(False)
