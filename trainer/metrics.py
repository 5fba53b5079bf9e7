"""Evaluation metrics (pure functions, numpy + torch): action errors, token accuracy, PSNR, SSIM.

    from trainer.metrics import action_errors, token_accuracy, psnr, ssim
    errs = action_errors(pred, target)          # {"l1": [D], "mse": [D], "l1_mean", "mse_mean"}
    psnr(pred_uint8, true_uint8); ssim(pred_uint8, true_uint8)   # images (..., H, W, 3)

SSIM is the Wang et al. (2004) index: an 11-tap Gaussian window (sigma 1.5) over each channel,
K1 = 0.01, K2 = 0.03, dynamic range 255, "valid" windows only (no padding), averaged over the
window positions and then the channels. PSNR is 10 log10(255^2 / MSE) over all pixels of an
image; identical images (MSE 0) are reported as PSNR_CAP dB so the value stays finite in JSON.
`Running` accumulates per-dimension sums so a report never holds every prediction in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DYNAMIC_RANGE = 255.0


# ---------------------------------------------------------------------------------------------
# Actions and tokens.
# ---------------------------------------------------------------------------------------------

def action_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Per-dimension mean absolute and squared error of (..., D) arrays, and their means."""
    pred, target = _same_shape(pred, target)
    diff = (pred - target).reshape(-1, pred.shape[-1])
    l1, mse = np.abs(diff).mean(axis=0), (diff ** 2).mean(axis=0)
    return {"l1": l1.tolist(), "mse": mse.tolist(), "l1_mean": float(l1.mean()),
            "mse_mean": float(mse.mean()), "count": int(diff.shape[0])}


def token_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of positions where the predicted id equals the target id."""
    pred, target = _same_shape(pred, target)
    return float((pred == target).mean()) if target.size else float("nan")


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} differs from target shape {b.shape}")
    return a.astype(np.float64) if a.dtype.kind == "f" else a, \
        b.astype(np.float64) if b.dtype.kind == "f" else b


class Running:
    """Sums of |e| and e^2 per dimension over batches of (..., D) errors."""

    def __init__(self) -> None:
        self.abs: np.ndarray | None = None
        self.sq: np.ndarray | None = None
        self.count = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = _same_shape(pred, target)
        diff = (pred - target).reshape(-1, pred.shape[-1])
        if self.abs is None:
            self.abs, self.sq = np.zeros(diff.shape[1]), np.zeros(diff.shape[1])
        self.abs += np.abs(diff).sum(axis=0)
        self.sq += (diff ** 2).sum(axis=0)
        self.count += diff.shape[0]

    def result(self) -> dict[str, Any]:
        if not self.count:
            return {"l1": [], "mse": [], "l1_mean": None, "mse_mean": None, "count": 0}
        l1, mse = self.abs / self.count, self.sq / self.count
        return {"l1": l1.tolist(), "mse": mse.tolist(), "l1_mean": float(l1.mean()),
                "mse_mean": float(mse.mean()), "count": int(self.count)}


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------

def _images(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) float64 views of two equal-shaped uint8 (or float 0..255) image stacks."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {pred.shape} vs {target.shape}")
    if pred.ndim == 2:
        pred, target = pred[..., None], target[..., None]
    if pred.ndim < 3:
        raise ValueError(f"images must be (..., H, W, C), got {pred.shape}")
    shape = (-1, *pred.shape[-3:])
    return pred.reshape(shape).astype(np.float64), target.reshape(shape).astype(np.float64)


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image of (..., H, W, C) stacks (range 255), capped at PSNR_CAP."""
    p, t = _images(pred, target)
    mse = ((p - t) ** 2).reshape(len(p), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(DYNAMIC_RANGE ** 2 / mse)
    return np.minimum(out, PSNR_CAP).reshape(np.asarray(pred).shape[:-3])


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian taps (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, C, H, W), each channel on its own."""
    c = x.shape[1]
    k = len(taps)
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean SSIM of each image of (..., H, W, C) stacks (range 255), channels averaged.

    Images smaller than the 11-px window use the largest odd window that fits (sigma scaled).
    """
    p, t = _images(pred, target)
    size = min(SSIM_WINDOW, *(d - (1 - d % 2) for d in p.shape[1:3]))
    taps = gaussian_window(size, SSIM_SIGMA * size / SSIM_WINDOW)
    x = torch.from_numpy(p).permute(0, 3, 1, 2)
    y = torch.from_numpy(t).permute(0, 3, 1, 2)
    c1, c2 = (SSIM_K1 * DYNAMIC_RANGE) ** 2, (SSIM_K2 * DYNAMIC_RANGE) ** 2
    mx, my = _blur(x, taps), _blur(y, taps)
    sxx = _blur(x * x, taps) - mx ** 2
    syy = _blur(y * y, taps) - my ** 2
    sxy = _blur(x * y, taps) - mx * my
    index = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return index.mean(dim=(1, 2, 3)).numpy().reshape(np.asarray(pred).shape[:-3])


def summary(values: list[float] | np.ndarray) -> dict[str, Any]:
    """Mean, std, min, max and count of a list of scalars (None when empty)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not v.size:
        return {"mean": None, "std": None, "min": None, "max": None, "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "count": int(v.size)}
