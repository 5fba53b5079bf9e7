"""Train the unified VLA + world model on shards: one readable loop.

    rynn-pipe train --shards out/demo/shards --out runs/demo --preset tiny --steps 300
    torchrun --nproc_per_node 2 -m pipeline.cli train --shards ... --out ...   # data parallel

Setup on top; then the loop: once in a while evaluate and save; one training step (gradient
accumulation, clipping, AdamW, the schedule as a pure function of the step); metrics to
`metrics.jsonl`, a loss-curve PNG at the end. All resumable state (step, RNG, data position) is in
the checkpoint, so `--resume` continues exactly: the resumed loss curve equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import RynnError
from pipeline.progress import Progress, console
from shards.reader import ShardReader
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.model import RynnModel
from trainer.schedule import lr_at

TERMS = ("loss", "ce_action", "ce_image", "l1", "ce", "z_loss")


# ---------------------------------------------------------------------------------------------
# Setup.
# ---------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def wrap(model: torch.nn.Module, cfg: TrainConfig, world: int, device: torch.device):
    if world == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        return FullyShardedDataParallel(model, use_orig_params=True)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=True)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Evaluation and logging.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: RynnModel, shards: Path, cfg: TrainConfig, device: torch.device,
             rank: int, world: int) -> dict[str, float]:
    """Mean loss terms over `eval_batches` batches of the held-out split."""
    model.eval()
    sums: dict[str, float] = {}
    seen: dict[str, int] = {}
    with ShardReader(shards, batch_size=cfg.batch_size, split="val", seed=cfg.seed, rank=rank,
                     world_size=world, shuffle=False, mix=cfg.mix) as reader:
        for _, batch in zip(range(cfg.eval_batches), reader):
            with autocast(cfg, device):
                out = model(to_device(batch, device), train_cfg=cfg)
            for k in present_terms(out, batch):
                sums[k] = sums.get(k, 0.0) + float(out[k])
                seen[k] = seen.get(k, 0) + 1
    model.train()
    return {f"val_{k}": v / seen[k] for k, v in sums.items()}


def log(run: Path, row: dict[str, Any]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def truncate_metrics(run: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again)."""
    path = run / "metrics.jsonl"
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def plot(run: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "ce_action" in r or "ce" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("ce_action", "ce_image", "l1")):
        ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r],
                label="train")
        ax.plot([r["step"] for r in val if f"val_{key}" in r],
                [r[f"val_{key}"] for r in val if f"val_{key}" in r], "o-", label="held-out")
        ax.set_title(key), ax.set_xlabel("step"), ax.legend()
    fig.tight_layout()
    out = run / "loss_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, shards: Path, out: Path, *, resume: bool = False,
          init: Path | None = None, stop_after: int | None = None) -> Path:
    """Train on `shards` into run directory `out`; returns the latest checkpoint directory.
    `stop_after` ends the process's work early at that step (tests: a run stopped mid-way)."""
    rank, world, device = setup_distributed()
    shards, out = Path(shards), Path(out)
    if not (shards / "manifest.json").exists():
        raise RynnError(f"--shards {shards}: no manifest.json (run `rynn-pipe tokenize` first)")
    card = ckpt.processor_card(shards)
    torch.manual_seed(cfg.seed)
    model = RynnModel(cfg.model, chunk=card["K"], action_dim=card["D"])
    if init is not None:
        console.print(f"init from {init}: {model.load_pretrained(init)}")
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    reader = ShardReader(shards, batch_size=cfg.batch_size, split=cfg.train_split, mix=cfg.mix,
                         seed=cfg.seed, rank=rank, world_size=world)
    state = {"step": 0}
    last = ckpt.latest(out) if resume else None
    if resume and last is None:
        console.print(f"--resume: no checkpoint in {out}; starting from step 0")
    if last is not None:
        check_same_run(last, card, cfg)
        state = ckpt.load_training(last, model, optimizer)
        reader.load_state_dict(state["reader"])
        console.print(f"resumed from {last.name}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out, state["step"])
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    net = wrap(model, cfg, world, device)
    loop(cfg, model, net, optimizer, reader, state, shards, out, card, device, rank, world,
         stop_after)
    reader.close()
    if rank == 0:
        plot(out)
    if world > 1:
        write_rank_digest(model, out, rank)
        dist.barrier()
    return ckpt.latest(out) or out


def check_same_run(step_dir: Path, card: dict[str, Any], cfg: TrainConfig) -> None:
    saved = ckpt.read_json(step_dir / ckpt.CARD)
    if saved["shards_manifest_sha256"] != card["shards_manifest_sha256"]:
        raise RynnError(f"--resume: {step_dir} was trained on other shards (manifest digest "
                        "differs); resume with the same --shards or start a new --out")
    saved_cfg, _, _ = ckpt.read_config(step_dir)
    if saved_cfg.model != cfg.model:
        raise RynnError(f"--resume: {step_dir} has another model shape; use the same --preset")


def loop(cfg: TrainConfig, model: RynnModel, net: torch.nn.Module,
         optimizer: torch.optim.Optimizer, reader: ShardReader, state: dict[str, Any],
         shards: Path, out: Path, card: dict[str, Any], device: torch.device, rank: int,
         world: int, stop_after: int | None) -> None:
    batches = reader.forever()
    model.train()
    window = Window()
    with Progress(cfg.steps - state["step"], "train", disable=rank != 0) as bar:
        while state["step"] < cfg.steps:
            step = state["step"]
            # ---- once in a while: evaluate, save
            if step > 0 and step % cfg.eval_every == 0:
                metrics = evaluate(model, shards, cfg, device, rank, world)
                if rank == 0 and metrics:
                    log(out, {"step": step, **metrics})
            # ---- single training step
            window.add(train_step(cfg, net, optimizer, batches, step, device))
            state["step"] = step + 1
            state["reader"] = reader.state_dict()
            bar.advance()
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                row = window.flush()
                if rank == 0:
                    log(out, {"step": step, **row})
            done = state["step"] == cfg.steps
            if rank == 0 and (state["step"] % cfg.save_every == 0 or done):
                ckpt.save(out, state["step"], model, optimizer, state, cfg, card, cfg.keep_last)
            if stop_after is not None and state["step"] >= stop_after:
                break
    if state["step"] == cfg.steps:
        metrics = evaluate(model, shards, cfg, device, rank, world)
        if rank == 0 and metrics:
            log(out, {"step": state["step"], **metrics})


def train_step(cfg: TrainConfig, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches, step: int, device: torch.device) -> dict[str, float]:
    lr = lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, kind=cfg.schedule,
               min_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, float] = {}
    seen: dict[str, int] = {}
    wait = compute = 0.0
    tokens = 0
    for _ in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = to_device(next(batches), device)
        t1 = time.perf_counter()
        with autocast(cfg, device):
            out = net(batch, train_cfg=cfg)
        (out["loss"] / cfg.grad_accum).backward()
        compute += time.perf_counter() - t1
        wait += t1 - t0
        tokens += int(batch["attention_mask"].sum())
        for k in present_terms(out, batch):
            sums[k] = sums.get(k, 0.0) + float(out[k].detach())
            seen[k] = seen.get(k, 0) + 1
    sums = {k: v / seen[k] for k, v in sums.items()}
    t2 = time.perf_counter()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    compute += time.perf_counter() - t2
    return {**sums, "lr": lr, "grad_norm": float(norm), "data_wait_s": wait,
            "compute_s": compute, "tokens": tokens, "tokens_per_s": tokens / max(wait + compute, 1e-9)}


class Window:
    """Loss terms averaged over the steps since the last log row (each term over the steps whose
    batches held its tokens); timings summed, tokens/s over the window."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)

    def flush(self) -> dict[str, float]:
        rows, self.rows = self.rows, []
        out: dict[str, float] = {"lr": rows[-1]["lr"], "grad_norm": rows[-1]["grad_norm"],
                                 "steps_averaged": len(rows)}
        for k in TERMS:
            vals = [r[k] for r in rows if k in r]
            if vals:
                out[k] = sum(vals) / len(vals)
        for k in ("data_wait_s", "compute_s", "tokens"):
            out[k] = sum(r[k] for r in rows)
        out["tokens_per_s"] = out["tokens"] / max(out["data_wait_s"] + out["compute_s"], 1e-9)
        return out


def present_terms(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[str]:
    """Loss terms that had tokens in this batch (a term with none is 0 by construction and is
    left out of the log rather than logged as 0)."""
    has_vla = bool(batch["is_vla"].any())
    has_wm = bool((~batch["is_vla"].bool()).any())
    absent = {"ce_action": not has_vla, "l1": not has_vla, "ce_image": not has_wm}
    return [k for k in TERMS if k in out and not absent.get(k, False)]


def write_rank_digest(model: torch.nn.Module, out: Path, rank: int) -> None:
    """Each rank's parameter checksum (a 2-process test checks they are identical)."""
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "param_sum": total}) + "\n")
