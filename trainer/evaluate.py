"""`rynn-pipe eval`: a checkpoint on the held-out split of a shard set -> JSON report + plots.

    from trainer.evaluate import evaluate
    report = evaluate("runs/demo/latest", "out/demo/shards", "runs/demo/eval", max_samples=32)

Samples come from the shard set's "val" split (the held-out tasks and trajectories). When the split
is empty, a prefix of the training split is used instead and the report says so
(`"split": "train (fallback: no val samples)"`): those numbers are NOT held-out numbers.

Metrics (`report.json` in `out`):
- actions, for the continuous head and for discrete greedy decoding (unconstrained, as the
  published decoder, so the grammar the model learned is measured): L1 and MSE per dimension
  and their means, in normalized [-1, 1] space and in robot units, against the shards'
  continuous (un-quantized) chunk; discrete samples whose generated blocks are malformed are
  counted with their problems and excluded from the errors (never patched);
- discrete token accuracy: teacher-forced argmax over the VLA response, on the action-bin tokens
  and on every response token (markers and SEP included);
- world model, teacher-forced: accuracy of the argmax among image-code ids on the code positions
  of the target frames, and plain argmax accuracy over every response token;
- world model, generated (greedy, forced image-block structure, `max_generate` samples): PSNR and
  SSIM of the decoded prediction against the VQ-GAN decoding of the target tokens (the shards hold
  tokens, not pixels, so the reference is the tokenizer's reconstruction), plus code accuracy;
- LPIPS (trainer/lpips.py, v0.1, alex or vgg) of the same prediction/reference pairs, only when
  `lpips_weights` names a directory with the reference weights (none can be downloaded here);
  otherwise reported as "not computed (no weights given)";
- FVD (trainer/fvd.py) of rollouts along held-out trajectories (`fvd_frames` steps, predictions
  fed back) vs the VQ-GAN decoding of their target tokens, only when `fvd_weights` names the
  TorchScript I3D detector; otherwise "not computed (no weights given)".
Plots: `action_l1_per_dim.png` (both modes), `wm_quality.png` (PSNR/SSIM per sample), and
`wm_examples.png` (prediction vs reference, front and wrist).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import RynnError
from pipeline.io import write_bytes, write_json
from pipeline.media import png_bytes
from shards import vocab
from shards.bins import unnormalize
from shards.shard_set import ShardSet
from trainer import metrics
from trainer.card import MalformedActions
from trainer.fvd import load_detector, rollout_fvd
from trainer.lpips import load_lpips
from trainer.policy import Policy
from trainer.world_model import (decode_codes, generate_frames, image_blocks_in, block_codes,
                                 response_codes, strip_image)

NOT_COMPUTED = "not computed (no weights given)"


class EvalError(RynnError):
    """The shard set cannot be evaluated with this checkpoint."""


# ---------------------------------------------------------------------------------------------
# Samples.
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    split: str                                       # what the report calls the split
    vla: list = field(default_factory=list)
    wm: list = field(default_factory=list)


def read_split(shards: ShardSet, split: str, max_samples: int) -> tuple[list, list]:
    out: dict[str, list] = {"vla": [], "wm": []}
    for entry in shards.entries():
        bucket = out[entry["kind"]]
        if len(bucket) < max_samples and entry.get("splits", {}).get(split, 1):
            bucket.extend(shards.read(entry, split)[:max_samples - len(bucket)])
    return out["vla"], out["wm"]


def load_eval_set(shards: ShardSet, max_samples: int) -> EvalSet:
    """The val split; a labelled training prefix when the val split is empty."""
    vla, wm = read_split(shards, "val", max_samples)
    if vla or wm:
        return EvalSet("val", vla, wm)
    vla, wm = read_split(shards, "train", max_samples)
    return EvalSet("train (fallback: no val samples)", vla, wm)


def check_compatible(policy: Policy, shards: ShardSet) -> list[str]:
    """Refuse shards whose tokens mean something else; return notes on harmless differences."""
    manifest = shards.manifest
    card, notes = policy.card, []
    pairs = (("tokenizer digest", manifest.get("tokenizer", {}).get("digest"),
              card.tokenizer.digest),
             ("VQ digest", manifest.get("vq", {}).get("digest"), card.vq.digest),
             ("resolution", manifest.get("vocab", {}).get("resolution"), card.resolution))
    for what, theirs, ours in pairs:
        if theirs != ours:
            raise EvalError(f"shards {what} {theirs!r} differs from the checkpoint's {ours!r}: "
                            "these shards were tokenized differently; re-tokenize them with the "
                            "checkpoint's tokenizer, VQ-GAN and resolution")
    stats = shards.stats()
    if not (np.array_equal(stats.action.min, card.stats.action.min)
            and np.array_equal(stats.action.max, card.stats.action.max)):
        notes.append("shard stats differ from the checkpoint's: action bins mean other values")
    return notes


# ---------------------------------------------------------------------------------------------
# VLA metrics.
# ---------------------------------------------------------------------------------------------

@dataclass
class VlaTally:
    cont_norm: metrics.Running = field(default_factory=metrics.Running)
    cont_robot: metrics.Running = field(default_factory=metrics.Running)
    disc_norm: metrics.Running = field(default_factory=metrics.Running)
    disc_robot: metrics.Running = field(default_factory=metrics.Running)
    bin_hits: int = 0
    bin_total: int = 0
    resp_hits: int = 0
    resp_total: int = 0
    malformed: list = field(default_factory=list)
    discrete_samples: int = 0


def robot(policy: Policy, norm: np.ndarray) -> np.ndarray:
    """Normalized -> robot units (relative dims stay relative: both sides alike)."""
    return unnormalize(norm, policy.card.stats.action.min, policy.card.stats.action.max)


def eval_vla_sample(policy: Policy, sample, tally: VlaTally, discrete: bool) -> None:
    tokens = np.asarray(sample.tokens, np.int64)
    start = int(sample.targets[0][0])
    truth = np.asarray(sample.chunk, np.float64)
    pred = policy.continuous_norm(tokens[:start])
    tally.cont_norm.add(pred, truth)
    tally.cont_robot.add(robot(policy, pred), robot(policy, truth))
    _teacher_forced_actions(policy, tokens, start, tally)
    if discrete:
        _generated_actions(policy, sample.key, tokens[:start], truth, tally)


def _teacher_forced_actions(policy: Policy, tokens: np.ndarray, start: int, tally: VlaTally) -> None:
    logits = policy.teacher_forced_logits(tokens, np.arange(start - 1, len(tokens) - 1))
    pred, target = logits.argmax(-1).cpu().numpy(), tokens[start:]
    is_bin = vocab.is_action_bin(target)
    tally.bin_hits += int((pred[is_bin] == target[is_bin]).sum())
    tally.bin_total += int(is_bin.sum())
    tally.resp_hits += int((pred == target).sum())
    tally.resp_total += len(target)


def _generated_actions(policy: Policy, key: str, prompt: np.ndarray, truth: np.ndarray,
                       tally: VlaTally) -> None:
    tally.discrete_samples += 1
    try:
        pred = policy.discrete_norm(prompt, constrained=False)
    except MalformedActions as exc:
        tally.malformed.append({"key": key, "problems": exc.problems})
        return
    tally.disc_norm.add(pred, truth)
    tally.disc_robot.add(robot(policy, pred), robot(policy, truth))


def vla_report(tally: VlaTally) -> dict[str, Any]:
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {
        "continuous": {"normalized": tally.cont_norm.result(), "robot": tally.cont_robot.result()},
        "discrete": {"normalized": tally.disc_norm.result(), "robot": tally.disc_robot.result(),
                     "samples": tally.discrete_samples, "malformed": len(tally.malformed),
                     "malformed_examples": tally.malformed[:10]},
        "token_accuracy": {"action_bins": ratio(tally.bin_hits, tally.bin_total),
                           "response": ratio(tally.resp_hits, tally.resp_total),
                           "bin_tokens": tally.bin_total}}


# ---------------------------------------------------------------------------------------------
# World-model metrics.
# ---------------------------------------------------------------------------------------------

@dataclass
class WmTally:
    code_hits: int = 0
    code_total: int = 0
    resp_hits: int = 0
    resp_total: int = 0
    gen_code_acc: list = field(default_factory=list)
    psnr: list = field(default_factory=list)
    ssim: list = field(default_factory=list)
    lpips: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    lpips_metric: Any = None              # trainer.lpips.LPIPS when weights were given


def eval_wm_sample(policy: Policy, sample, tally: WmTally, generate: bool) -> None:
    tokens = np.asarray(sample.tokens, np.int64)
    start = int(sample.targets[0][0])
    logits = policy.teacher_forced_logits(tokens, np.arange(start - 1, len(tokens) - 1))
    target = tokens[start:]
    tally.resp_hits += int((logits.argmax(-1).cpu().numpy() == target).sum())
    tally.resp_total += len(target)
    is_code = vocab.is_image_code(target)
    code_ids = torch.from_numpy(policy.processor.tokenizer.image_code_to_id).to(logits.device)
    restricted = code_ids[logits[:, code_ids].argmax(-1)].cpu().numpy()
    tally.code_hits += int((restricted[is_code] == target[is_code]).sum())
    tally.code_total += int(is_code.sum())
    if generate:
        _generated_frames(policy, tokens, start, tally)


def _generated_frames(policy: Policy, tokens: np.ndarray, start: int, tally: WmTally) -> None:
    response = generate_frames(policy, tokens[:start])
    pred = response_codes(policy, response)
    truth = np.stack([block_codes(policy, b) for b in image_blocks_in(policy, tokens, start)])
    images = decode_codes(policy, np.stack([pred, truth]))       # (2, 2 views, H, W, 3)
    tally.gen_code_acc.append(float((pred == truth).mean()))
    tally.psnr.extend(metrics.psnr(images[0], images[1]).tolist())
    tally.ssim.extend(metrics.ssim(images[0], images[1]).tolist())
    if tally.lpips_metric is not None:
        tally.lpips.extend(tally.lpips_metric(images[0], images[1]).tolist())
    if len(tally.examples) < 4:
        tally.examples.append(images)


def wm_report(tally: WmTally, fvd: dict[str, Any] | None) -> dict[str, Any]:
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"teacher_forced": {"code_accuracy": ratio(tally.code_hits, tally.code_total),
                               "response_accuracy": ratio(tally.resp_hits, tally.resp_total),
                               "code_tokens": tally.code_total},
            "generated": {"code_accuracy": metrics.summary(tally.gen_code_acc),
                          "psnr_db": metrics.summary(tally.psnr),
                          "ssim": metrics.summary(tally.ssim),
                          "reference": "VQ-GAN decoding of the shard's target tokens",
                          "images": len(tally.psnr)},
            "lpips": (NOT_COMPUTED if tally.lpips_metric is None else
                      {**metrics.summary(tally.lpips), "net": tally.lpips_metric.net,
                       "reference": "VQ-GAN decoding of the shard's target tokens"}),
            "fvd": NOT_COMPUTED if fvd is None else fvd}


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------

def plot_actions(report: dict[str, Any], path: Path) -> None:
    import matplotlib  # slow to import; only runs that plot pay for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: slow to import, only plots need it
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, mode in enumerate(("continuous", "discrete")):
        l1 = report[mode]["normalized"]["l1"]
        if l1:
            ax.bar(np.arange(len(l1)) + 0.4 * i - 0.2, l1, width=0.4, label=mode)
    ax.set_xlabel("action dimension")
    ax.set_ylabel("L1 (normalized)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_wm(tally: WmTally, path: Path) -> None:
    import matplotlib  # slow to import; only runs that plot pay for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: slow to import, only plots need it
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for ax, values, name in ((axes[0], tally.psnr, "PSNR (dB)"), (axes[1], tally.ssim, "SSIM")):
        ax.plot(values, "o")
        ax.set_xlabel("generated image")
        ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_examples(tally: WmTally, path: Path) -> None:
    """Columns: examples; rows: pred front, reference front, pred wrist, reference wrist."""
    pred = np.stack([e[0] for e in tally.examples])
    truth = np.stack([e[1] for e in tally.examples])
    write_bytes(path, png_bytes(strip_image(pred, truth)))


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------

def evaluate(checkpoint: str | Path, shards: str | Path, out: str | Path, *,
             max_samples: int = 32, max_discrete: int = 16, max_generate: int = 4,
             vq_path: str | None = None, tokenizer_path: str | None = None,
             device: str = "auto", lpips_weights: str | Path | None = None,
             lpips_net: str | None = None,
             fvd_weights: str | Path | None = None, fvd_videos: int = 8,
             fvd_frames: int = 16) -> dict[str, Any]:
    """Evaluate `checkpoint` on `shards` (val split); write report.json and plots into `out`.
    Optional: `lpips_weights`, a directory with LPIPS v0.1 weights (trainer/lpips.py);
    `fvd_weights`, the TorchScript I3D detector, for FVD over `fvd_videos` rollouts of
    `fvd_frames` steps (trainer/fvd.py)."""
    t0 = time.perf_counter()
    shards, out = ShardSet.open(shards), Path(out)
    policy = Policy.from_checkpoint(checkpoint, vq_path=vq_path, tokenizer_path=tokenizer_path,
                                    device=device)
    notes = check_compatible(policy, shards)
    data = load_eval_set(shards, max_samples)
    if not data.vla and not data.wm:
        raise EvalError(f"{shards.where}: no samples to evaluate")
    vla, wm = VlaTally(), WmTally()
    if lpips_weights is not None:
        wm.lpips_metric = load_lpips(lpips_weights, device=policy.backend.device, net=lpips_net)
    detector = None
    if fvd_weights is not None:
        detector = load_detector(fvd_weights, device=policy.backend.device)
    for i, sample in enumerate(data.vla):
        eval_vla_sample(policy, sample, vla, i < max_discrete)
    for i, sample in enumerate(data.wm):
        eval_wm_sample(policy, sample, wm, i < max_generate)
    report = {"checkpoint": str(checkpoint), "shards": shards.where, "split": data.split,
              "held_out": data.split == "val", "notes": notes,
              "samples": {"vla": len(data.vla), "wm": len(data.wm)},
              "card": {"recipe": policy.card.recipe, "K": policy.card.chunk,
                       "D": policy.card.action_dim, "resolution": policy.card.resolution},
              "actions": vla_report(vla),
              "world_model": wm_report(wm, fvd_report(
                  policy, shards, detector, "val" if data.split == "val" else "train",
                  fvd_videos, fvd_frames)),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_outputs(report, vla, wm, out)
    return report


def fvd_report(policy: Policy, shards: ShardSet, detector, split: str, videos: int,
               frames: int) -> dict[str, Any] | None:
    if detector is None:
        return None
    return rollout_fvd(policy, shards, detector, split=split, videos=videos, frames=frames)


def write_outputs(report: dict[str, Any], vla: VlaTally, wm: WmTally, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": "report.json"}
    if vla.cont_norm.count:
        plot_actions(report["actions"], out / "action_l1_per_dim.png")
        files["actions_plot"] = "action_l1_per_dim.png"
    if wm.psnr:
        plot_wm(wm, out / "wm_quality.png")
        write_examples(wm, out / "wm_examples.png")
        files.update(wm_plot="wm_quality.png", wm_examples="wm_examples.png")
    report["files"] = files
    write_json(out / "report.json", report)
