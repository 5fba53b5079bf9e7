"""FVD (Unterthiner et al. 2018) of world-model rollouts, from an I3D detector the user supplies.

Nothing can be downloaded here, so FVD runs only when `rynn-pipe eval --fvd-weights FILE` names
the TorchScript I3D (Kinetics-400) that StyleGAN-V published as `i3d_torchscript.pt` and that
most FVD code uses. It is called the way that code calls it: float videos (N, 3, T, H, W) with
values in [0, 255], `rescale=True, resize=True, return_features=True` (the detector maps to
[-1, 1] and 224 px itself and returns the 400 pre-softmax features). This project could not run
the real file (no download); the call is tested on a stand-in TorchScript module with the same
signature.

Videos: along `videos` held-out trajectories of `frames` world-model steps, the model's rollout
(predictions fed back, as `imagine --rollout`) against the VQ-GAN decoding of the shard's target
tokens; front and wrist views are separate videos. FVD is the Frechet distance between Gaussians
fitted to the two feature sets: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    detector = load_detector("weights/i3d_torchscript.pt")
    report = rollout_fvd(policy, shards, detector, videos=8, frames=16)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import RynnError
from shards.shard_set import ShardSet
from trainer.world_model import decode_codes, imagine_codes, trajectory_of, wm_samples_by_episode

DETECTOR_KWARGS = {"rescale": True, "resize": True, "return_features": True}


class FvdError(RynnError):
    """FVD cannot be computed as asked."""


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise FvdError(f"--fvd-weights {path}: file not found (the TorchScript I3D detector, "
                       "i3d_torchscript.pt)")
    try:
        # TorchScript is deprecated in torch, but it is the format the detector ships in.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise FvdError(f"--fvd-weights {path}: not a TorchScript module ({exc})") from exc


@torch.no_grad()
def i3d_features(detector, videos: np.ndarray, batch: int = 4) -> np.ndarray:
    """uint8 videos (N, T, H, W, 3) -> float64 features (N, F)."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise FvdError(f"videos must be uint8 (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    device = next((p.device for p in detector.parameters()), torch.device("cpu"))
    out = []
    for i in range(0, len(videos), batch):
        x = torch.from_numpy(videos[i:i + batch]).permute(0, 4, 1, 2, 3).float().to(device)
        out.append(detector(x, **DETECTOR_KWARGS).double().cpu().numpy())
    return np.concatenate(out).reshape(len(videos), -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows a (N, F) and b (M, F).
    tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)) (both PSD)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise FvdError(f"FVD needs at least 2 videos per side, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def rollout_videos(policy, shards: str | Path | ShardSet, split: str, *, videos: int,
                   frames: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(predicted, reference) uint8 videos (2 * n, frames, H, W, 3) from the first `videos`
    episodes of `split` with at least `frames` world-model steps; and those episodes."""
    groups = wm_samples_by_episode(shards, split)
    episodes = [e for e, samples in groups.items() if len(samples) >= frames][:videos]
    if not episodes:
        longest = max((len(v) for v in groups.values()), default=0)
        raise FvdError(f"no {split} episode has {frames} world-model steps (longest: {longest}); "
                       "lower --fvd-frames")
    pred, truth = [], []
    for episode in episodes:
        traj = trajectory_of(policy, episode, split, groups[episode][:frames])
        codes, _ = imagine_codes(policy, traj.start_codes, traj.bins)
        for stack, source in ((pred, codes), (truth, traj.truth)):
            decoded = decode_codes(policy, source)                  # (frames, 2, H, W, 3)
            stack.extend(decoded[:, view] for view in range(decoded.shape[1]))
    return np.stack(pred), np.stack(truth), episodes


def rollout_fvd(policy, shards: str | Path | ShardSet, detector, *, split: str = "val",
                videos: int = 8, frames: int = 16) -> dict[str, Any]:
    pred, truth, episodes = rollout_videos(policy, shards, split, videos=videos, frames=frames)
    value = frechet_distance(i3d_features(detector, pred), i3d_features(detector, truth))
    return {"fvd": value, "videos": len(pred), "episodes": episodes, "frames": frames,
            "split": split, "views": "front and wrist as separate videos",
            "reference": "VQ-GAN decoding of the shard's target tokens",
            "detector_call": "float (N, 3, T, H, W) in [0, 255], rescale=True, resize=True, "
                             "return_features=True"}
