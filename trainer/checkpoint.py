"""Checkpoints: `<run>/step-NNNNNN/` written atomically, a `latest` pointer, keep-last-N.

A step directory holds everything inference and resume need:
    model.safetensors   model + head weights
    checksums.json      its sha256 (checked on load, with its header and every tensor finite)
    optimizer.pt        optimizer state
    state.pt            training state: step, RNG states of every rank, data-reader position
    config.json         the resolved TrainConfig and model dims (K, D)
    processor.json      the processor card: shard manifest digest, stats, tokenizer and VQ digests,
                        vocabulary facts, recipe, K, D, M, resolution, orientation

    model = load_model(Path("runs/demo/step-000300"))

Under torch.distributed, `save` and `load_training` are collective (every rank calls them): full
weights and optimizer state are gathered from DDP or FSDP2-sharded modules, rank 0 writes, and on
load each rank takes its share. Plain single-process modules work the same way.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pipeline.errors import RynnError
from pipeline.group import Group
from shards.shard_set import ShardSet
from pipeline.io import fsync_dir, read_json, sha256_file, write_bytes, write_json
from shards.records import VQRecord
from trainer.config import ModelConfig, TrainConfig
from trainer.model import RynnModel

LATEST = "latest"
CARD = "processor.json"
CHECKSUMS = "checksums.json"     # sha256 of model.safetensors, checked when the weights load


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def processor_card(shards: str | Path | ShardSet) -> dict[str, Any]:
    """What inference needs to reproduce training's preprocessing, from the shard manifest."""
    shard_set = ShardSet.open(shards)
    man, record = shard_set.manifest, shard_set.record
    conv, images = record("conv"), man.get("images", {})
    return {"schema": 1, "shards_manifest_sha256": shard_set.sha256,
            "stats": shard_set.stats_record(), "tokenizer": record("tokenizer"),
            "vq": VQRecord.from_json(record("vq")).to_json(), "vocab": record("vocab"), "recipe": record("recipe"),
            "K": conv["chunk"], "D": conv["action_dim"], "state_dim": conv["state_dim"],
            "M": conv["history"], "resolution": record("vocab")["resolution"],
            "orientation": images.get("orientation", "rot180"),
            "relative_action_dims": conv.get("relative_action_dims", []),
            "fit": images.get("fit", "square"), **wm_facts(man)}


def wm_facts(man: dict[str, Any]) -> dict[str, Any]:
    """compat=published shard sets: the world-model code grid (when it is one non-square grid)
    and the views per world-model turn (1 for the published SO100 samples)."""
    grids = man.get("images", {}).get("wm_grids", [])
    out: dict[str, Any] = {"wm_views": 1 if man["conv"].get("wm_views") == "per_camera" else 2}
    if len(grids) == 1:      # several sizes of frames: imagine/eval take the square layout
        out["wm_grid"] = list(grids[0])
    return out


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective; each rank draws its own dropout)."""
    world = Group.from_env().world
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def save(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], cfg: TrainConfig, card: dict[str, Any], keep_last: int) -> Path:
    """Write step-NNNNNN/ under a temporary name, rename it, then move `latest` to it.
    Collective under torch.distributed: every rank gathers, rank 0 writes."""
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    rngs = all_rng_states()
    final = run / step_name(step)
    if not Group.from_env().leader:
        return final
    bad = nonfinite(weights)
    if bad is not None:
        raise RynnError(f"step {step}: weight {bad} is not finite (NaN/inf); nothing saved. The "
                        "run diverged: lower lr or check the data")
    tmp = run / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()},
              str(tmp / "model.safetensors"))
    write_json(tmp / CHECKSUMS, {"model.safetensors": sha256_file(tmp / "model.safetensors")})
    torch.save(optim, tmp / "optimizer.pt")
    torch.save({**state, "rng": rngs}, tmp / "state.pt")
    write_json(tmp / "config.json", {"train": dataclasses.asdict(cfg), "chunk": card["K"],
                                     "action_dim": card["D"]})
    write_json(tmp / CARD, card)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_bytes(run / LATEST, f"{final.name}\n".encode())
    fsync_dir(run)
    prune(run, keep_last)
    return final


def nonfinite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf, or None."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """`model.safetensors`, its header and every tensor checked: damage is an error naming it."""
    path = step_dir / "model.safetensors"
    if not path.is_file():
        raise RynnError(f"{path}: missing; point --checkpoint at a step-NNNNNN directory")
    sums = step_dir / CHECKSUMS
    if sums.is_file() and sha256_file(path) != read_json(sums).get(path.name):
        raise RynnError(f"{path}: does not match its sha256 in {CHECKSUMS}; the checkpoint is "
                        "damaged: use another step")
    try:
        weights = load_file(str(path))
    except Exception as exc:       # SafetensorError (bad header, truncated) is not exported
        raise RynnError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())}); "
                        "the checkpoint is damaged: use another step") from None
    bad = nonfinite(weights)
    if bad is not None:
        raise RynnError(f"{path}: tensor {bad} holds NaN/inf; the checkpoint is damaged or "
                        "diverged: use another step")
    return weights


def remove_debris(run: Path) -> list[Path]:
    """`.tmp-*` left by a save that was killed (a step directory or the `latest` pointer)."""
    found = sorted(run.glob(".tmp-*"))
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return found


def prune(run: Path, keep_last: int) -> None:
    steps = sorted(p for p in run.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def latest(run: Path) -> Path | None:
    pointer = run / LATEST
    if not pointer.exists():
        return None
    path = run / pointer.read_text().strip()
    if not (path / "model.safetensors").exists():
        raise RynnError(f"{pointer} points at {path.name}, which is missing or incomplete")
    return path


def read_config(step_dir: Path) -> tuple[TrainConfig, int, int]:
    path = step_dir / "config.json"
    if not path.is_file():
        raise RynnError(f"{path}: missing; point --checkpoint at a step-NNNNNN directory of a run")
    doc = read_json(path)
    try:
        train = dict(doc["train"])
        model = ModelConfig(**train.pop("model"))
        return TrainConfig(model=model, **train), int(doc["chunk"]), int(doc["action_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RynnError(f"{path}: not a checkpoint config ({type(exc).__name__}: {exc})") from None


def load_model(step_dir: Path) -> torch.nn.Module:
    """The network of a checkpoint directory (eval mode, CPU)."""
    cfg, chunk, action_dim = read_config(step_dir)
    model = RynnModel(cfg.model, chunk=chunk, action_dim=action_dim)
    try:
        model.load_state_dict(load_weights(step_dir))
    except RuntimeError as exc:        # names or shapes that do not fit config.json
        raise RynnError(f"{step_dir}: model.safetensors does not fit its config.json "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval()


def load_training(step_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                  ) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG; return the saved training state.
    Collective under torch.distributed (every rank reads the files: a shared filesystem)."""
    weights = load_weights(step_dir)
    optim = torch.load(step_dir / "optimizer.pt", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=True))
    state = torch.load(step_dir / "state.pt", weights_only=False)
    rngs = state.pop("rng")
    group = Group.from_env()
    if len(rngs) != group.world:
        raise RynnError(f"--resume: {step_dir} was written by {len(rngs)} processes, this run has "
                        f"{group.world}; resume with the same number of processes (the data order "
                        "and dropout depend on it)")
    set_rng_state(rngs[group.rank])
    return state
