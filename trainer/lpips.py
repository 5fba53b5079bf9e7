"""LPIPS (Zhang et al. 2018, version 0.1) from weights the user supplies by path.

Nothing can be downloaded here, so the metric runs only when `rynn-pipe eval --lpips-weights DIR`
points at a directory holding the two files the reference implementation (the `lpips` package)
loads (`--lpips-net alex|vgg` picks one when both are there, as in the lpips package's own
`lpips/weights/v0.1/` folder, which can be given as it is):
    alex.pth  or  vgg.pth         the linear calibration layers of LPIPS v0.1 (keys
                                  `lin{k}.model.1.weight`, shape (1, C_k, 1, 1))
    alexnet-*.pth or vgg16-*.pth  torchvision's ImageNet backbone checkpoint (keys
                                  `features.{i}.weight/bias`; its `classifier.*` is unused), in
                                  the directory or in torch hub's cache (`$TORCH_HOME/hub/
                                  checkpoints`, where torchvision downloads it)
Every backbone feature key and every calibration key must be present with its shape (strict).

The network is the reference's: inputs in [-1, 1] shifted and scaled per channel, the backbone's
activations after five ReLUs, each unit-normalized over channels, squared differences weighted
by the 1x1 calibration convolutions, averaged over space and summed over the five layers.

    metric = load_lpips(Path("weights/lpips"))
    d = metric(images_a, images_b)        # uint8 (N, H, W, 3) each -> (N,) distances
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import RynnError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# torchvision `features` layouts (indices = state-dict keys), up to the last tapped ReLU:
# ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel)   (pool stride 2)
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3), ("conv", 64, 192, 5, 1, 2), ("relu",),
         ("pool", 3), ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1),
         ("relu",), ("conv", 256, 256, 3, 1, 1), ("relu",)]
_VGG: list[tuple] = []
for _block, (_cin, _cout, _n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3),
                                            (256, 512, 3), (512, 512, 3)]):
    if _block:
        _VGG.append(("pool", 2))
    for _i in range(_n):
        _VGG += [("conv", _cin if _i == 0 else _cout, _cout, 3, 1, 1), ("relu",)]

# net -> (layers, indices whose outputs are tapped, backbone file pattern)
NETS = {"alex": (_ALEX, (1, 4, 7, 9, 11), "alexnet*.pth"),
        "vgg": (_VGG, (3, 8, 15, 22, 29), "vgg16*.pth")}


def _build(layers: list[tuple]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for spec in layers:
        if spec[0] == "conv":
            _, cin, cout, k, s, p = spec
            mods.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        elif spec[0] == "relu":
            mods.append(nn.ReLU())
        else:
            mods.append(nn.MaxPool2d(kernel_size=spec[1], stride=2))
    return nn.Sequential(*mods)


def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in NETS:
            raise RynnError(f"LPIPS net {net!r}: choose one of {sorted(NETS)}")
        layers, self.taps, _ = NETS[net]
        self.net = net
        self.features = _build(layers)
        channels = [self.features[i - 1].out_channels for i in self.taps]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
            if i == self.taps[-1]:
                break
        return out

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: float (N, 3, H, W) in [-1, 1] -> (N,)."""
        total = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
        for fa, fb, lin in zip(self.activations(a), self.activations(b), self.lins):
            diff = (unit_normalize(fa) - unit_normalize(fb)).pow(2)
            total += lin(diff).mean(dim=(1, 2, 3))
        return total

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) each -> float64 (N,) distances."""
        return self.distance(_to_tensor(a, self), _to_tensor(b, self)).double().cpu().numpy()


def _to_tensor(images: np.ndarray, module: nn.Module) -> torch.Tensor:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise RynnError(f"LPIPS takes uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(module.shift.device)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RynnError(f"--lpips-weights {path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise RynnError(f"--lpips-weights {path}: expected a state dict, got {type(state).__name__}")
    return state


def _strict(path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing = [k for k in want if k not in got]
    wrong = [f"{k} {tuple(got[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
             if k in got and tuple(got[k].shape) != tuple(v.shape)]
    if missing or wrong:
        raise RynnError(f"--lpips-weights {path}: "
                        + "; ".join(([f"missing keys {missing[:4]}"] if missing else [])
                                    + ([f"wrong shapes {wrong[:4]}"] if wrong else [])))


def find_files(directory: Path, net: str | None = None) -> tuple[str, Path, Path]:
    """(net, calibration file, backbone file) for a weights directory. `net` picks alex or vgg;
    without it the directory must hold only one of alex.pth / vgg.pth. The backbone file is
    looked for in the directory, then in torch hub's checkpoint cache (where torchvision keeps
    it), so the lpips package's own `weights/v0.1/` folder works as shipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RynnError(f"--lpips-weights {directory}: not a directory (it must hold alex.pth or "
                        "vgg.pth; the lpips package ships them in lpips/weights/v0.1/)")
    if net is not None and net not in NETS:
        raise RynnError(f"--lpips-net {net!r}: choose one of {sorted(NETS)}")
    present = [n for n in NETS if (directory / f"{n}.pth").exists()]
    if net is None and len(present) > 1:
        raise RynnError(f"--lpips-weights {directory}: holds {', '.join(f'{n}.pth' for n in present)}"
                        f"; choose one with --lpips-net {'|'.join(present)}")
    net = net or (present[0] if present else None)
    if net is None or net not in present:
        raise RynnError(f"--lpips-weights {directory}: no {net + '.pth' if net else 'alex.pth or vgg.pth'}"
                        " (LPIPS v0.1 calibration weights) found")
    return net, directory / f"{net}.pth", _backbone(directory, net)


def _backbone(directory: Path, net: str) -> Path:
    pattern = NETS[net][2]
    places = [directory, Path(torch.hub.get_dir()) / "checkpoints"]
    for place in places:
        found = sorted(place.glob(pattern)) if place.is_dir() else []
        if len(found) > 1:
            raise RynnError(f"--lpips-weights: {place} holds several {pattern} files "
                            f"{[p.name for p in found]}; keep one")
        if found:
            return found[0]
    raise RynnError(f"--lpips-weights {directory}: {net}.pth needs torchvision's {pattern} "
                    f"backbone checkpoint, found in neither {places[0]} nor {places[1]}; put "
                    "it in either")


def load_lpips(directory: str | Path, device: str | torch.device = "cpu",
               net: str | None = None) -> LPIPS:
    net, lin_path, backbone_path = find_files(Path(directory), net)
    metric = LPIPS(net)
    want_features = {f"features.{k}": v for k, v in metric.features.state_dict().items()}
    backbone = _load(backbone_path)
    _strict(backbone_path, backbone, want_features)
    metric.features.load_state_dict({k[len("features."):]: backbone[k] for k in want_features})
    want_lins = {f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(metric.lins)}
    calibration = _load(lin_path)
    _strict(lin_path, calibration, want_lins)
    extra = sorted(set(calibration) - set(want_lins))
    if extra:
        raise RynnError(f"--lpips-weights {lin_path}: unexpected keys {extra[:4]}")
    for i, lin in enumerate(metric.lins):
        lin.weight.copy_(calibration[f"lin{i}.model.1.weight"])
    return metric.to(device)
