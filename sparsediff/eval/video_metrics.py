"""PSNR and SSIM between two videos, in torch (CPU or GPU).

Videos are ``(T, C, H, W)`` or ``(T, H, W, C)`` (``layout="thwc"``) tensors or arrays with values in
``[0, data_range]``. SSIM follows Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
K2 = 0.03, computed per channel on each frame and averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_tchw(video, layout: str) -> torch.Tensor:
    x = torch.as_tensor(video)
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4:
        raise ValueError(f"expected a video of 4 dims (T, C, H, W) or (T, H, W, C), got shape {tuple(x.shape)}")
    if layout == "thwc":
        x = x.permute(0, 3, 1, 2)
    elif layout != "tchw":
        raise ValueError(f"layout must be 'tchw' or 'thwc', got {layout!r}")
    return x.to(torch.float64)


def _pair(a, b, layout):
    a, b = _as_tchw(a, layout), _as_tchw(b, layout)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b.to(a.device)


def psnr_per_frame(a, b, *, data_range: float = 1.0, layout: str = "tchw") -> torch.Tensor:
    """PSNR in dB of each frame ``(T,)``; identical frames give ``inf``."""
    a, b = _pair(a, b, layout)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr(a, b, *, data_range: float = 1.0, layout: str = "tchw") -> float:
    """PSNR over the whole video (from the mean squared error of all frames)."""
    a, b = _pair(a, b, layout)
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_per_frame(a, b, *, data_range: float = 1.0, layout: str = "tchw", window: int = 11,
                   sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of each frame ``(T,)`` (valid region only, no padding)."""
    a, b = _pair(a, b, layout)
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])  # tiny frames: shrink the window to fit
    w = _gaussian_window(size, sigma, channels, a.device)
    blur = lambda x: F.conv2d(x, w, groups=channels)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def ssim(a, b, *, data_range: float = 1.0, layout: str = "tchw", window: int = 11, sigma: float = 1.5) -> float:
    """SSIM averaged over frames and channels."""
    return float(ssim_per_frame(a, b, data_range=data_range, layout=layout, window=window, sigma=sigma).mean())


def compare_videos(a, b, *, data_range: float = 1.0, layout: str = "tchw") -> dict:
    """``{"psnr", "ssim", "psnr_per_frame", "ssim_per_frame"}`` of ``b`` against reference ``a``."""
    per_psnr = psnr_per_frame(a, b, data_range=data_range, layout=layout)
    per_ssim = ssim_per_frame(a, b, data_range=data_range, layout=layout)
    return {"psnr": psnr(a, b, data_range=data_range, layout=layout), "ssim": float(per_ssim.mean()),
            "psnr_per_frame": [float(x) for x in per_psnr], "ssim_per_frame": [float(x) for x in per_ssim]}
