"""LPIPS from user-supplied weights: files in the reference formats (torchvision backbone
checkpoint + LPIPS v0.1 calibration), strict loading, and the distance recomputed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import RynnError
from trainer.lpips import LPIPS, load_lpips

# torchvision's AlexNet `features`: conv indices -> (out, in, kernel); stride/padding per conv
ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
ALEX_GEOMETRY = {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}
VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def write_lpips_weights(directory: Path, net: str = "alex", seed: int = 0) -> Path:
    """Random weights with the reference files' names, keys and shapes: the torchvision
    checkpoint (features + classifier) and lpips' `<net>.pth` (non-negative 1x1 weights)."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    model = LPIPS(net)
    backbone = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05
                for k, v in model.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.randn(8, 4, generator=g)    # unused by LPIPS
    backbone["classifier.1.bias"] = torch.randn(8, generator=g)
    name = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
    torch.save(backbone, directory / name)
    lins = {f"lin{i}.model.1.weight": torch.rand(lin.weight.shape, generator=g)
            for i, lin in enumerate(model.lins)}
    torch.save(lins, directory / f"{net}.pth")
    return directory


def _images(seed: int, n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _by_hand(weights: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The LPIPS v0.1 formula written out with functional ops on the raw state dicts."""
    feats = torch.load(weights / "alexnet-owt-7be5be79.pth")
    lins = torch.load(weights / "alex.pth")
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def taps(img: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
        h = (x - shift) / scale
        out = []
        for i, conv in enumerate(sorted(ALEX_CONVS)):
            if i in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            stride, pad = ALEX_GEOMETRY[conv]
            h = F.relu(F.conv2d(h, feats[f"features.{conv}.weight"], feats[f"features.{conv}.bias"],
                                stride=stride, padding=pad))
            out.append(h)
        return out

    total = torch.zeros(len(a))
    for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weighted = ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1)
        total += weighted.mean(dim=(1, 2))
    return total.double().numpy()


def test_alex_distance_matches_the_formula_by_hand(tmp_path):
    weights = write_lpips_weights(tmp_path / "w")
    metric = load_lpips(weights)
    a, b = _images(1), _images(2)
    d = metric(a, b)
    np.testing.assert_allclose(d, _by_hand(weights, a, b), rtol=1e-4, atol=1e-7)
    assert (d > 0).all()
    np.testing.assert_allclose(metric(b, a), d, rtol=1e-5)
    assert np.array_equal(metric(a, a), np.zeros(2))


def test_vgg_loads_and_ranks_a_small_change_closer(tmp_path):
    metric = load_lpips(write_lpips_weights(tmp_path / "w", "vgg"))
    assert metric.net == "vgg"
    assert sorted(int(k.split(".")[0]) for k in metric.features.state_dict()
                  if k.endswith("weight")) == VGG_CONVS
    a = _images(3, n=1)
    near = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    far = _images(4, n=1)
    assert metric(a, near)[0] < metric(a, far)[0]


def test_missing_or_wrong_weights_are_named(tmp_path):
    weights = write_lpips_weights(tmp_path / "w")
    backbone = torch.load(weights / "alexnet-owt-7be5be79.pth")
    del backbone["features.6.weight"]
    torch.save(backbone, weights / "alexnet-owt-7be5be79.pth")
    with pytest.raises(RynnError, match=r"alexnet-owt-7be5be79.pth: missing keys \['features.6"):
        load_lpips(weights)
    weights = write_lpips_weights(tmp_path / "w2")
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, weights / "alex.pth")
    with pytest.raises(RynnError, match="alex.pth: missing keys .*wrong shapes"):
        load_lpips(weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RynnError, match="no alex.pth or vgg.pth"):
        load_lpips(tmp_path / "empty")
    with pytest.raises(RynnError, match="uint8"):
        load_lpips(write_lpips_weights(tmp_path / "w3"))(np.zeros((1, 8, 8, 3)), _images(0, 1, 8))


def test_the_lpips_packages_weight_folder_as_shipped(tmp_path, monkeypatch):
    """lpips ships `weights/v0.1/{alex,vgg,squeeze}.pth` without backbones (torchvision keeps
    those in torch hub's cache): --lpips-net picks the network; none given is an error naming it."""
    import shutil
    alex, vgg = write_lpips_weights(tmp_path / "a", "alex"), write_lpips_weights(tmp_path / "v", "vgg")
    shipped, hub = tmp_path / "lpips" / "weights" / "v0.1", tmp_path / "hub"
    shipped.mkdir(parents=True)
    (hub / "checkpoints").mkdir(parents=True)
    for src, net, backbone in ((alex, "alex", "alexnet-owt-7be5be79.pth"),
                               (vgg, "vgg", "vgg16-397923af.pth")):
        shutil.copy(src / f"{net}.pth", shipped)
        shutil.copy(src / backbone, hub / "checkpoints")
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, shipped / "squeeze.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(RynnError, match=r"alex.pth, vgg.pth; choose one with --lpips-net alex\|vgg"):
        load_lpips(shipped)
    a, b = _images(0), _images(1)
    for net, reference in (("alex", alex), ("vgg", vgg)):
        metric = load_lpips(shipped, net=net)
        assert metric.net == net
        np.testing.assert_array_equal(metric(a, b), load_lpips(reference)(a, b))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty"))
    with pytest.raises(RynnError, match=r"needs torchvision's alexnet\*.pth backbone"):
        load_lpips(shipped, net="alex")
    with pytest.raises(RynnError, match=r"--lpips-net 'squeeze'"):
        load_lpips(shipped, net="squeeze")
