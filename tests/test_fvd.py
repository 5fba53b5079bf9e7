"""FVD: the Frechet distance against hand-computed values, and the detector call (layout, value
range, keyword arguments) through a stand-in TorchScript module with the I3D file's signature."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.fvd import FvdError, frechet_distance, i3d_features, load_detector


class StandInI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt; refuses any other convention."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, bias=False)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert x.dim() == 5 and x.shape[1] == 3, "expected (N, 3, T, H, W)"
        assert rescale and resize and return_features, "expected the FVD keyword arguments"
        assert float(x.max()) <= 255.0 and float(x.max()) > 1.0, "expected values in [0, 255]"
        x = x / 127.5 - 1.0
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)
        return self.proj(stats)


def write_detector(path: Path) -> Path:
    with warnings.catch_warnings():          # TorchScript is deprecated; the real file is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(StandInI3D()), str(path))
    return path


def test_frechet_distance_hand_computed():
    # 1-D: means 1 and 4, sample variances 1 and 4 -> (1-4)^2 + 1 + 4 - 2*sqrt(1*4) = 10
    a = np.array([[1 - np.sqrt(0.5)], [1 + np.sqrt(0.5)]])
    b = np.array([[4 - np.sqrt(2.0)], [4 + np.sqrt(2.0)]])
    assert frechet_distance(a, b) == pytest.approx(10.0)
    # 2-D with diagonal covariances diag(1, 4) and diag(9, 1), means (0,0) and (1,2):
    # |mu|^2 = 5; traces 5 + 10; 2 * (sqrt(9) + sqrt(4)) = 10 -> 5 + 15 - 10 = 10
    pts = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)   # covariance diag(2/3, 2/3)
    a = pts * np.sqrt(1.5) * np.array([1, 2])
    b = pts * np.sqrt(1.5) * np.array([3, 1]) + np.array([1, 2])
    assert frechet_distance(a, b) == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(6.0)
    with pytest.raises(FvdError, match="at least 2 videos"):
        frechet_distance(feats[:1], feats)


def test_detector_is_called_with_the_i3d_convention(tmp_path):
    detector = load_detector(write_detector(tmp_path / "i3d_torchscript.pt"))
    videos = np.random.default_rng(1).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
    feats = i3d_features(detector, videos, batch=2)
    assert feats.shape == (3, 5) and feats.dtype == np.float64
    # float32 features from a batch of 2 vs the same video alone: batch-dependent kernels differ
    # by a few ulps (2.3e-7 relative seen), so compare at what float32 arithmetic can meet.
    np.testing.assert_allclose(feats[1:2], i3d_features(detector, videos[1:2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(FvdError, match="uint8"):
        i3d_features(detector, videos.astype(np.float32))
    with pytest.raises(FvdError, match="not found"):
        load_detector(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(FvdError, match="not a TorchScript module"):
        load_detector(tmp_path / "junk.pt")
