"""PSNR / SSIM used by ``sparsediff generate --compare-dense``."""

import math

import numpy as np
import pytest
import torch

from sparsediff.eval.video_metrics import compare_videos, psnr, psnr_per_frame, ssim, ssim_per_frame


def test_psnr_known_values():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    assert psnr(a, b) == math.inf
    b[0] += 0.1  # frame 0: mse 0.01 -> 20 dB; whole video mse 0.005 -> 23.01 dB
    per = psnr_per_frame(a, b)
    assert per[0].item() == pytest.approx(20.0) and math.isinf(per[1].item())
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.005))


def test_ssim_identity_and_ordering():
    # Drawn on CPU (the same numbers on every device), then on the default device.
    g = torch.Generator().manual_seed(0)
    dev = torch.get_default_device()
    a = torch.rand(3, 3, 32, 32, generator=g, device="cpu")
    slightly = (a + 0.02 * torch.randn(a.shape, generator=g, device="cpu")).clamp(0, 1)
    heavily = (a + 0.3 * torch.randn(a.shape, generator=g, device="cpu")).clamp(0, 1)
    a, slightly, heavily = a.to(dev), slightly.to(dev), heavily.to(dev)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 1.0 > ssim(a, slightly) > ssim(a, heavily) > 0.0
    assert ssim_per_frame(a, slightly).shape == (3,)


def test_layouts_agree_and_shapes_checked():
    g = torch.Generator().manual_seed(1)
    # On CPU: the same numbers on every device, and .numpy() below needs CPU tensors.
    a, b = torch.rand(2, 3, 16, 16, generator=g, device="cpu"), torch.rand(2, 3, 16, 16, generator=g, device="cpu")
    tchw = compare_videos(a, b)
    thwc = compare_videos(a.permute(0, 2, 3, 1).numpy(), np.asarray(b.permute(0, 2, 3, 1)), layout="thwc")
    assert tchw["psnr"] == pytest.approx(thwc["psnr"]) and tchw["ssim"] == pytest.approx(thwc["ssim"])
    with pytest.raises(ValueError, match="shape"):
        psnr(a, b[:1])
