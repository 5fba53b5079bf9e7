"""World model: imagine the next front/wrist frames from the current ones and an action.

    from trainer.policy import Policy
    from trainer.world_model import imagine, rollout
    policy = Policy.from_checkpoint("runs/demo/latest")
    result = imagine(policy, front, wrist, action, out="runs/demo/imagine")   # raw arrays
    result.codes   # (steps, 2, h, w) codebook indices; result.images (steps, 2, H, W, 3) uint8
    report = rollout(policy, "out/demo/shards", steps=8, out="runs/demo/rollout")

The query is the shards' world-model sequence (SPEC.md 6): BOS + WM prompt + [front_j, wrist_j]
image blocks + the action block of a_j + SEP. The response layout is fixed (two image blocks), so
generation forces every structural token (image start, grid, row ends, image end) and chooses
only the code positions, among the 8192 image-code ids (greedy, or sampled with `temperature`).
Codes are decoded with the checkpoint's VQ-GAN decoder. Images are in TRAINING orientation (the
card's; upright for LIBERO), like the frames the model saw.

With `steps > 1` (and one action per step) predictions are fed back: step i's predicted frames
are step i+1's input. `rollout` does that along a held-out episode of a shard set, taking the
actions and the ground truth from its consecutive world-model samples, and writes a strip PNG
(rows: predicted front, true front, predicted wrist, true wrist; one column per step; the ground
truth is the VQ-GAN decoding of the shard's target tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError, RynnError
from pipeline.io import write_bytes, write_json
from pipeline.media import png_bytes
from shards import vocab
from shards.conversation import assemble, blocks_by_kind, image_blocks, parse_image_block
from shards.vq_decoder import decode
from shards.bins import to_bins
from shards.shard_set import ShardSet
from trainer.engine import Stepper
from trainer.metrics import psnr, ssim
from trainer.policy import check_image

VIEWS = ("front", "wrist")


class WorldModelError(RynnError):
    """Bad world-model inputs (shapes, actions, shard samples)."""


@dataclass
class Imagined:
    codes: np.ndarray                    # (steps, 2, h, w) int64 codebook indices
    images: np.ndarray                   # (steps, 2, H, W, 3) uint8, training orientation
    tokens: list[np.ndarray] = field(default_factory=list)   # generated response per step
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Image blocks <-> codes.
# ---------------------------------------------------------------------------------------------

def code_positions(side: int | tuple[int, int]) -> np.ndarray:
    """Offsets of the code tokens inside one image block of side x side (or rows x cols) codes."""
    h, w = (side, side) if isinstance(side, int) else side
    rows = np.arange(h)[:, None] * (w + 1) + np.arange(w)[None, :]
    return (3 + rows).reshape(-1)


def wm_layout(policy) -> tuple[tuple[int, int], int, int]:
    """(code grid, views per turn, block length) of the checkpoint's world-model images: square
    at the card's resolution and two views, or (compat=published) the shard set's one
    world-model grid and, for SO100, one view per turn."""
    raw = policy.card.raw
    side = policy.card.resolution // vocab.VQ_DOWNSAMPLE
    h, w = raw.get("wm_grid") or (side, side)
    return (int(h), int(w)), int(raw.get("wm_views", 2)), 3 + int(h) * (int(w) + 1) + 1


def sample_blocks(policy, tokens: np.ndarray, start: int = 1) -> dict[str, list[np.ndarray]]:
    """The blocks of a token sequence from `start` on (1: after BOS), by kind, in order."""
    card = policy.card
    return blocks_by_kind(tokens, action_dim=card.action_dim, state_dim=card.state_dim,
                          start=start)


def image_blocks_in(policy, tokens: np.ndarray, start: int = 1) -> list[np.ndarray]:
    """Every image block of a token sequence from `start` on (1: after BOS), in order."""
    return sample_blocks(policy, tokens, start)["image"]


def block_codes(policy, block: np.ndarray) -> np.ndarray:
    """One image block -> its (h, w) codebook indices; WorldModelError on a non-code token."""
    try:
        return parse_image_block(block, policy.processor.tokenizer.id_to_image_code)
    except DataError as exc:
        raise WorldModelError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# One step.
# ---------------------------------------------------------------------------------------------

def wm_prompt(policy, codes: np.ndarray, action_bins: np.ndarray) -> np.ndarray:
    """BOS + WM prompt + [front, wrist] blocks + action block + SEP. codes: (2, h, w)."""
    proc = policy.processor
    text = np.asarray(proc.tokenizer.encode(vocab.WM_PROMPT), np.int64)
    blocks = list(image_blocks(np.asarray(codes), proc.tokenizer.image_code_to_id))
    tokens, _ = assemble([text, *blocks, vocab.action_block(action_bins)], [])
    return tokens[:-1]


def allowed_codes(policy) -> torch.Tensor:
    """Bool (V,) mask of the image-code ids."""
    mask = torch.zeros(vocab.VOCAB_SIZE, dtype=torch.bool)
    mask[torch.from_numpy(policy.processor.tokenizer.image_code_to_id)] = True
    return mask


def generate_frames(policy, prompt: np.ndarray, *, temperature: float = 0.0,
                    generator: torch.Generator | None = None,
                    use_cache: bool = True) -> np.ndarray:
    """The response [front block, wrist block] with forced structure; returns its tokens."""
    grid, views, n = wm_layout(policy)
    template = image_blocks(np.zeros((views, *grid), np.int64),
                            policy.processor.tokenizer.image_code_to_id).reshape(-1)
    is_code = np.zeros(len(template), dtype=bool)
    for b in range(views):
        is_code[b * n + code_positions(grid)] = True
    stepper, allowed = Stepper(policy.backend, prompt, use_cache=use_cache), allowed_codes(policy)
    for pos, token in enumerate(template.tolist()):
        if not is_code[pos]:
            stepper.append(token)
        elif temperature <= 0:
            stepper.greedy(allowed)
        else:
            stepper.append(_sample(stepper.next_logits(), allowed, temperature, generator))
    return np.asarray(stepper.ids[len(prompt):], dtype=np.int64)


def _sample(logits: torch.Tensor, allowed: torch.Tensor, temperature: float,
            generator: torch.Generator | None) -> int:
    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf")) / temperature
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def response_codes(policy, response: np.ndarray) -> np.ndarray:
    """Generated response tokens -> (views, h, w) codes."""
    return np.stack([block_codes(policy, b) for b in image_blocks_in(policy, response, 0)])


def decode_codes(policy, codes: np.ndarray) -> np.ndarray:
    """(..., h, w) codes -> (..., H, W, 3) uint8 with the checkpoint's VQ-GAN decoder."""
    codes = np.asarray(codes)
    flat = decode(policy.processor.vq, codes.reshape(-1, *codes.shape[-2:]))
    return flat.reshape(*codes.shape[:-2], *flat.shape[1:])


# ---------------------------------------------------------------------------------------------
# The API.
# ---------------------------------------------------------------------------------------------

def action_bins(policy, action: np.ndarray, state: np.ndarray | None) -> np.ndarray:
    """Robot-unit actions (steps, D) -> bins, made relative to `state` on relative dims."""
    card = policy.card
    action = np.asarray(action, dtype=np.float64)
    action = action[None] if action.ndim == 1 else action
    if action.ndim != 2 or action.shape[1] != card.action_dim:
        raise WorldModelError(f"action: expected (D,) or (steps, D) with D={card.action_dim}, "
                              f"got {np.shape(action)}")
    if card.relative_dims:
        if state is None:
            raise WorldModelError(f"recipe {card.recipe!r} uses actions relative to the state on "
                                  f"dims {list(card.relative_dims)}: pass state=")
        action = action.copy()
        action[:, list(card.relative_dims)] -= np.asarray(state, np.float64)[list(card.relative_dims)]
    return to_bins(card.codec().action_norm(action), card.num_bins)


def imagine_codes(policy, codes: np.ndarray, bins: np.ndarray, *, temperature: float = 0.0,
                  seed: int = 0, use_cache: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """From (2, h, w) codes and action bins (steps, D): predicted codes (steps, 2, h, w)."""
    generator = torch.Generator().manual_seed(seed)
    out, responses = [], []
    for step_bins in np.asarray(bins):
        response = generate_frames(policy, wm_prompt(policy, codes, step_bins),
                                   temperature=temperature, generator=generator,
                                   use_cache=use_cache)
        codes = response_codes(policy, response)
        out.append(codes)
        responses.append(response)
    return np.stack(out), responses


def imagine(policy, front: np.ndarray, wrist: np.ndarray, action: np.ndarray, *, steps: int = 1,
            state: np.ndarray | None = None, out: str | Path | None = None,
            temperature: float = 0.0, seed: int = 0) -> Imagined:
    """Raw current frames + action(s) in robot units -> imagined next frames (PNGs in `out`).

    `action` is (D,) (repeated for every step) or (steps, D).
    """
    bins = action_bins(policy, action, state)
    if len(bins) == 1 and steps > 1:
        bins = np.repeat(bins, steps, axis=0)
    if len(bins) != steps:
        raise WorldModelError(f"{len(bins)} actions given for steps={steps}")
    square = not policy.card.published_fit
    codes = policy.processor.wm_image_codes([check_image(front, "front", square),
                                             check_image(wrist, "wrist", square)])
    if wm_layout(policy)[1] == 2:
        pred, responses = imagine_codes(policy, np.stack(codes), bins, temperature=temperature,
                                        seed=seed)
    else:                       # published SO100: each camera is its own world-model stream
        runs = [imagine_codes(policy, c[None], bins, temperature=temperature, seed=seed)
                for c in codes]
        pred = np.concatenate([r[0] for r in runs], axis=1)
        responses = [r for run in runs for r in run[1]]
    result = Imagined(pred, decode_codes(policy, pred), responses)
    if out is not None:
        result.files = write_frames(result.images, Path(out))
    return result


def write_frames(images: np.ndarray, out: Path) -> list[str]:
    """step_NNN_<view>.png for each (step, view) image."""
    files = []
    for i, pair in enumerate(images):
        for view, img in zip(VIEWS, pair):
            path = out / f"step_{i:03d}_{view}.png"
            write_bytes(path, png_bytes(img))
            files.append(str(path))
    return files


# ---------------------------------------------------------------------------------------------
# Rollout along a held-out episode of a shard set.
# ---------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    episode: str
    split: str
    start_codes: np.ndarray      # (2, h, w)
    bins: np.ndarray             # (steps, D)
    truth: np.ndarray            # (steps, 2, h, w) ground-truth next-frame codes


def wm_samples_by_episode(shards: str | Path | ShardSet, split: str) -> dict[str, list]:
    """World-model samples of `split`, grouped by episode and sorted by step."""
    shard_set = ShardSet.open(shards)
    groups: dict[str, list] = {}
    for entry in shard_set.entries("wm"):
        for s in shard_set.read(entry, split):
            episode, step = s.key.rsplit("__", 1)
            groups.setdefault(episode, []).append((int(step), s))
    return {e: [s for _, s in sorted(v, key=lambda x: x[0])] for e, v in sorted(groups.items())}


def pick_trajectory(policy, shards: str | Path | ShardSet, steps: int, episode: str | None = None,
                    start: int = 0) -> Trajectory:
    """`steps` consecutive world-model samples of one held-out (else training) episode."""
    shards, split = ShardSet.open(shards), "val"
    groups = wm_samples_by_episode(shards, split)
    if not groups:
        split, groups = "train", wm_samples_by_episode(shards, "train")
    if wm_layout(policy)[1] == 1:       # published SO100: the front stream (even steps)
        groups = {e: v[::2] for e, v in groups.items()}
    if episode is not None and episode not in groups:
        raise WorldModelError(f"episode {episode!r} has no {split} world-model samples; "
                              f"choose one of {sorted(groups)[:5]}")
    candidates = [episode] if episode else [e for e, v in groups.items() if len(v) >= start + steps]
    if not candidates or len(groups[candidates[0]]) < start + steps:
        raise WorldModelError(f"no {split} episode has {start + steps} world-model steps; "
                              "lower --steps")
    samples = groups[candidates[0]][start:start + steps]
    return trajectory_of(policy, candidates[0], split, samples)


def trajectory_of(policy, episode: str, split: str, samples: list) -> Trajectory:
    views = wm_layout(policy)[1]
    bins, truth = [], []
    for s in samples:
        parts = sample_blocks(policy, s.tokens)
        blocks, actions = parts["image"], parts["action"]
        if len(blocks) != 2 * views or len(actions) != 1:
            raise WorldModelError(f"{s.key}: expected {2 * views} image blocks and one action "
                                  f"block, found {len(blocks)} and {len(actions)}")
        bins.append(vocab.parse_action_block(actions[0]))
        truth.append([block_codes(policy, b) for b in blocks[views:]])
    first = image_blocks_in(policy, samples[0].tokens)[:views]
    start = np.stack([block_codes(policy, b) for b in first])
    return Trajectory(episode, split, start, np.stack(bins), np.asarray(truth))


def rollout(policy, shards: str | Path | ShardSet, *, steps: int = 8, out: str | Path,
            episode: str | None = None, start: int = 0) -> dict[str, Any]:
    """Feed predictions back along a held-out trajectory; write the strip PNG and metrics."""
    traj = pick_trajectory(policy, shards, steps, episode, start)
    pred, _ = imagine_codes(policy, traj.start_codes, traj.bins)
    images, truth = decode_codes(policy, pred), decode_codes(policy, traj.truth)
    out = Path(out)
    strip = strip_image(images, truth)
    write_bytes(out / "rollout_strip.png", png_bytes(strip))
    report = {"episode": traj.episode, "split": traj.split, "start": start, "steps": steps,
              "held_out": traj.split == "val",
              "token_accuracy": float((pred == traj.truth).mean()),
              "psnr": psnr(images, truth).mean(axis=1).tolist(),
              "ssim": ssim(images, truth).mean(axis=1).tolist(),
              "strip": str(out / "rollout_strip.png")}
    write_json(out / "rollout.json", report)
    return report


def strip_image(pred: np.ndarray, truth: np.ndarray, gap: int = 2) -> np.ndarray:
    """Rows: pred front, true front, pred wrist, true wrist (per view); one column per step."""
    steps, views, h, w, _ = pred.shape
    rows = [x[:, v] for v in range(views) for x in (pred, truth)]
    canvas = np.full((len(rows) * h + (len(rows) - 1) * gap, steps * w + (steps - 1) * gap, 3),
                     255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(steps):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = row[c]
    return canvas
