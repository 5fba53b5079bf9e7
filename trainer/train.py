"""Train the unified VLA + world model on shards: one readable loop.

    rynn-pipe train --shards out/demo/shards --out runs/demo --preset tiny --steps 300
    torchrun --nproc_per_node 8 -m pipeline.cli train --shards ... --out ...   # data parallel
    torchrun ... train ... --set distributed=fsdp        # FSDP2: shard every decoder layer

Setup on top; then the loop: once in a while evaluate and save; one training step (gradient
accumulation, clipping, AdamW, the schedule as a pure function of the step); metrics to
`metrics.jsonl` (`step` = optimizer steps completed, as in `step-NNNNNN/`), a loss-curve PNG at
the end. All resumable state (step, every rank's RNG, data position) is in the checkpoint, so
`--resume` continues exactly: the resumed loss curve equals the uninterrupted one.
Under torchrun each rank reads its own part of the shards; logged losses are averaged over ranks;
only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.markup import escape
from torch.distributed.fsdp import fully_shard

from pipeline.errors import BadJSON, RynnError
from pipeline.group import Group
from pipeline.io import read_jsonl, write_bytes, write_json
from pipeline.publish import hold
from pipeline.progress import Progress, console
from pipeline.threads import limit_threads, local_processes
from shards.reader import ShardReader
from shards.remote import is_url
from shards.shard_set import ShardSet
from trainer import checkpoint as ckpt
from trainer.config import ModelConfig, TrainConfig
from trainer.loss import Loss
from trainer.model import RynnModel
from trainer.pretrained import reconcile
from trainer.schedule import lr_at

TERMS = ("loss", "ce_action", "ce_image", "l1", "ce", "z_loss")


# ---------------------------------------------------------------------------------------------
# Setup.
# ---------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[Group, torch.device]:
    """This rank's group (joined: nccl on CUDA, gloo on CPU; torch's default timeout) and
    device, from torchrun's environment (pipeline/group.py)."""
    group = Group.from_env()
    device = group.device()
    group.join(device, timeout_s=None)
    return group, device


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA with bf16 support ("auto"), or wherever `precision=bf16` asks."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_split(cfg: TrainConfig, shards: ShardSet) -> str:
    """`train_split`, with "auto" read from the shard manifest (compat=published: "all")."""
    return shards.training_split if cfg.train_split == "auto" else cfg.train_split


def init_model_config(model_cfg: ModelConfig, init: Path, rank: int) -> ModelConfig:
    """The preset with the --init checkpoint's architecture fields adopted (each one said);
    fields that shape the weights and differ are refused (trainer/pretrained.py)."""
    adopted, notes = reconcile(model_cfg, init)
    for note in notes if rank == 0 else []:
        console.print(f"[yellow]{escape(note)}[/]")
    return adopted


def build_model(cfg: TrainConfig, card: dict[str, Any], init: Path | None,
                device: torch.device) -> RynnModel:
    """Seeded, so every rank starts from the same weights."""
    torch.manual_seed(cfg.seed)
    model = RynnModel(cfg.model, chunk=card["K"], action_dim=card["D"])
    if init is not None:
        console.print(f"init from {init}: {model.load_pretrained(init)}")
    return model.to(device)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, the head's queries' scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    impl = {} if cfg.adamw == "auto" else {cfg.adamw: True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **impl)


def wrap(model: RynnModel, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """DDP (default) or FSDP2 (`distributed=fsdp`: each decoder layer a shard unit, then the
    root). Every parameter gets a gradient every step (see RynnModel.head_on_rows), so DDP
    needs no unused-parameter search."""
    if world == 1:
        return model
    if cfg.distributed == "fsdp":
        for layer in model.backbone.layers:
            fully_shard(layer)
        return fully_shard(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def gradient_sync(net: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):          # FSDP2
        net.set_requires_gradient_sync(False)
        return _ReenableSync(net)
    return contextlib.nullcontext()


class _ReenableSync(contextlib.AbstractContextManager):
    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __exit__(self, *exc: object) -> None:
        self.net.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------
# Loss bookkeeping, evaluation and logging.
# ---------------------------------------------------------------------------------------------

def present_terms(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[str]:
    """Loss terms that had tokens in this batch (a term with none is 0 by construction and is
    left out of the log rather than logged as 0)."""
    has_vla = bool(batch["is_vla"].any())
    has_wm = bool((~batch["is_vla"].bool()).any())
    absent = {"ce_action": not has_vla, "l1": not has_vla, "ce_image": not has_wm}
    return [k for k in TERMS if k in out and not absent.get(k, False)]


class Terms:
    """Running sums of the loss terms present in each batch; `mean()` averages over batches
    and, under torch.distributed, over ranks (one all-reduce)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(TERMS), dtype=torch.float64)
        self.counts = torch.zeros(len(TERMS), dtype=torch.float64)

    def add(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for k in present_terms(out, batch):
            self.sums[TERMS.index(k)] += float(out[k].detach())
            self.counts[TERMS.index(k)] += 1

    def mean(self, device: torch.device) -> dict[str, float]:
        both = torch.stack([self.sums, self.counts])
        if dist.is_initialized():
            both = both.to(device)
            dist.all_reduce(both)
        sums, counts = both.cpu()
        return {k: float(sums[i] / counts[i]) for i, k in enumerate(TERMS) if counts[i] > 0}


@torch.no_grad()
def evaluate(net: torch.nn.Module, loss: Loss, shards: ShardSet, cfg: TrainConfig,
             device: torch.device, group: Group) -> dict[str, float]:
    """Mean loss terms over `eval_batches` batches of the held-out split (all ranks); none when
    the shard set holds no held-out sample (compat=published: LeRobot has no split)."""
    if not shards.split_samples("val"):
        return {}
    net.eval()
    terms = Terms()
    with ShardReader(shards, batch_size=cfg.batch_size, split="val", seed=cfg.seed,
                     rank=group.rank, world_size=group.world, shuffle=False,
                     mix=cfg.mix) as reader:
        for _, batch in zip(range(cfg.eval_batches), reader):
            batch = to_device(batch, device)
            with autocast(cfg, device):
                out = loss(net(batch), batch)
            terms.add(out, batch)
    net.train()
    return {f"val_{k}": v for k, v in terms.mean(device).items()}


def log(run: Path, row: dict[str, Any]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def truncate_metrics(run: Path, step: int) -> None:
    """On resume from the checkpoint at `step`, drop rows that will be logged again: training
    rows after it, and held-out rows from it on (evaluation at `step` runs after its save). A
    torn last line (a kill mid-write) is dropped; a damaged line elsewhere is an error."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return
    rows = [row for row in read_jsonl(path, torn_tail=True)
            if row["step"] < step or (row["step"] == step and "loss" in row)]
    write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def finished(run: Path, cfg: TrainConfig, shards: ShardSet) -> bool:
    """The run's latest checkpoint is step cfg.steps and its final row is logged (the held-out
    row when the shards have a held-out split)."""
    last = ckpt.latest(run)
    path = run / "metrics.jsonl"
    if last is None or last.name != ckpt.step_name(cfg.steps) or not path.exists():
        return False
    try:
        rows = read_jsonl(path)
    except BadJSON:
        return False
    held_out = shards.splits.get("counts", {}).get("val")
    final = [r for r in rows if "loss" not in r] if held_out else rows
    return bool(final) and final[-1]["step"] == cfg.steps


def plot(run: Path) -> Path:
    import matplotlib            # in here: pyplot loads only once the Agg backend is chosen
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: slow to import, only plots need it
    rows = read_jsonl(run / "metrics.jsonl", torn_tail=True)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    published = any("ce" in r for r in train)
    keys = ("ce", "z_loss", "l1") if published else ("ce_action", "ce_image", "l1")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, keys):
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

def train(cfg: TrainConfig, shards: Path | str, out: Path, *, resume: bool = False,
          init: Path | None = None) -> Path:
    """Train on `shards` (a directory or a URL) into run directory `out`; returns the latest
    checkpoint directory.
    `cfg` carries the preset and step count (`resolve_train_config(preset, sets, steps=)`).
    An exported shard set is held for the whole run (pipeline/publish.py): a re-export meanwhile
    publishes a new version beside it, and this run reads the version it started on."""
    if is_url(shards):
        return _train(cfg, str(shards), out, resume=resume, init=init)
    with hold(Path(shards)) as snapshot:
        return _train(cfg, snapshot, out, resume=resume, init=init)


def _train(cfg: TrainConfig, shards: Path | str, out: Path, *, resume: bool,
           init: Path | None) -> Path:
    group, device = setup_distributed()
    limit_threads(local_processes())                # this rank's share of the cores
    out = Path(out)
    shards = ShardSet.open(shards)                  # a directory or a URL (shards/remote.py)
    card = ckpt.processor_card(shards)
    if resume and finished(out, cfg, shards):
        console.print(f"--resume: {out} already finished at step {cfg.steps}; nothing to do "
                      "(raise --steps to train further)")
        return ckpt.latest(out)
    if init is not None:
        cfg = replace(cfg, model=init_model_config(cfg.model, Path(init), group.rank))
    model = build_model(cfg, card, init, device)
    net = wrap(model, cfg, group.world, device)
    optimizer = build_optimizer(net, cfg)
    torch.manual_seed(cfg.seed + group.rank)        # each rank draws its own dropout
    reader = ShardReader(shards, batch_size=cfg.batch_size, split=training_split(cfg, shards),
                         mix=cfg.mix,
                         seed=cfg.seed, rank=group.rank, world_size=group.world)
    state = restore(out, card, cfg, net, optimizer, reader) if resume else {"step": 0}
    if group.leader:
        out.mkdir(parents=True, exist_ok=True)
        for debris in ckpt.remove_debris(out):
            console.print(f"removed {debris.name} (left by a killed save)")
        truncate_metrics(out, state["step"])
        write_json(out / "train_config.json", asdict(cfg))
    loop(cfg, net, Loss(cfg.loss), optimizer, reader, state, shards, out, card, device, group)
    reader.close()
    if group.leader:
        plot(out)
    group.barrier()
    return ckpt.latest(out) or out


def restore(out: Path, card: dict[str, Any], cfg: TrainConfig, net: torch.nn.Module,
            optimizer: torch.optim.Optimizer, reader: ShardReader) -> dict[str, Any]:
    """The training state of the run's latest checkpoint (weights, optimizer, RNG, data)."""
    last = ckpt.latest(out)
    if last is None:
        console.print(f"--resume: no checkpoint in {out}; starting from step 0")
        return {"step": 0}
    check_same_run(last, card, cfg)
    state = ckpt.load_training(last, net, optimizer)
    reader.load_state_dict(state["reader"])
    console.print(f"resumed from {last.name}")
    return state


def check_same_run(step_dir: Path, card: dict[str, Any], cfg: TrainConfig) -> None:
    saved = ckpt.read_json(step_dir / ckpt.CARD)
    if saved["shards_manifest_sha256"] != card["shards_manifest_sha256"]:
        raise RynnError(f"--resume: {step_dir} was trained on other shards (manifest digest "
                        "differs); resume with the same --shards or start a new --out")
    saved_cfg, _, _ = ckpt.read_config(step_dir)
    if saved_cfg.model != cfg.model:
        differ = [f"model.{f.name}: saved {getattr(saved_cfg.model, f.name)!r}, now "
                  f"{getattr(cfg.model, f.name)!r}" for f in fields(cfg.model)
                  if getattr(saved_cfg.model, f.name) != getattr(cfg.model, f.name)]
        raise RynnError(f"--resume: {step_dir} has another model shape ({'; '.join(differ)}); "
                        "use the same --preset, --set and --init")
    for name in ("batch_size", "grad_accum", "seed", "mix", "train_split"):
        if getattr(saved_cfg, name) != getattr(cfg, name):
            raise RynnError(f"--resume: {step_dir} was trained with {name}="
                            f"{getattr(saved_cfg, name)}, this run has {getattr(cfg, name)}; "
                            f"resume with --set {name}={getattr(saved_cfg, name)} or start a new "
                            "--out (the data order depends on it)")


def loop(cfg: TrainConfig, net: torch.nn.Module, loss: Loss, optimizer: torch.optim.Optimizer,
         reader: ShardReader, state: dict[str, Any], shards: ShardSet, out: Path,
         card: dict[str, Any], device: torch.device, group: Group) -> None:
    batches = reader.forever()
    net.train()
    window = Window()
    with Progress(cfg.steps - state["step"], "train", disable=not group.leader) as bar:
        while state["step"] < cfg.steps:
            # ---- once in a while: evaluate on the held-out split
            if state["step"] > 0 and state["step"] % cfg.eval_every == 0:
                check_shards_unchanged(shards, card)
                metrics = evaluate(net, loss, shards, cfg, device, group)
                if group.leader and metrics:
                    log(out, {"step": state["step"], **metrics})
            # ---- single training step
            window.add(train_step(cfg, net, loss, optimizer, batches, state["step"], device))
            state["step"] += 1
            state["reader"] = reader.state_dict()
            bar.advance()
            # ---- once in a while: log, save
            done = state["step"] == cfg.steps
            if state["step"] % cfg.log_every == 0 or done:
                row = window.flush(device)
                if group.leader:
                    log(out, {"step": state["step"], **row})
            if state["step"] % cfg.save_every == 0 or done:
                ckpt.save(out, state["step"], net, optimizer, state, cfg, card, cfg.keep_last)
    check_shards_unchanged(shards, card)
    metrics = evaluate(net, loss, shards, cfg, device, group)
    if group.leader and metrics:
        log(out, {"step": state["step"], **metrics})


def check_shards_unchanged(shards: ShardSet, card: dict[str, Any]) -> None:
    """The held-out reads must come from the set training started on."""
    if shards.current_sha256() != card["shards_manifest_sha256"]:
        raise RynnError(f"--shards {shards.where}: manifest.json changed since training started "
                        "(the set was re-exported); train on a set nothing rewrites (a new set "
                        "needs a new --out)")


def train_step(cfg: TrainConfig, net: torch.nn.Module, loss: Loss,
               optimizer: torch.optim.Optimizer, batches, step: int, device: torch.device
               ) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's numbers."""
    lr = lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, kind=cfg.schedule,
               min_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    terms, wait, compute, tokens = Terms(), 0.0, 0.0, 0
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = to_device(next(batches), device)
        t1 = time.perf_counter()
        with gradient_sync(net, micro == cfg.grad_accum - 1):
            with autocast(cfg, device):
                out = loss(net(batch), batch)
            check_finite(out["loss"], step)
            (out["loss"] / cfg.grad_accum).backward()
        terms.add(out, batch)
        compute += time.perf_counter() - t1
        wait += t1 - t0
        tokens += int(batch["attention_mask"].sum())
    t2 = time.perf_counter()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP2: a DTensor
    check_finite(norm, step, "gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    compute += time.perf_counter() - t2
    return {"terms": terms, "lr": lr, "grad_norm": float(norm), "data_wait_s": wait,
            "compute_s": compute, "tokens": tokens,
            "tokens_per_s": tokens / max(wait + compute, 1e-9)}


def check_finite(value: torch.Tensor, step: int, what: str = "loss") -> None:
    """A NaN/inf loss or gradient stops the run before the optimizer step (nothing is saved)."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise RynnError(f"step {step}: {what} is {float(value.detach()):g} (not finite); the run "
                        "stopped with nothing saved from it. Lower lr (or check the shards with "
                        "`rynn-pipe verify`) and --resume from the last checkpoint")


class Window:
    """The steps since the last log row: loss terms averaged over them (each term over the
    batches holding its tokens) and over ranks; timings summed; tokens/s of this rank."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self, device: torch.device) -> dict[str, float]:
        rows, self.rows = self.rows, []
        merged = Terms()
        for r in rows:
            merged.sums += r["terms"].sums
            merged.counts += r["terms"].counts
        out: dict[str, float] = {"lr": rows[-1]["lr"], "grad_norm": rows[-1]["grad_norm"],
                                 "steps_averaged": len(rows), **merged.mean(device)}
        for k in ("data_wait_s", "compute_s", "tokens"):
            out[k] = sum(r[k] for r in rows)
        out["tokens_per_s"] = out["tokens"] / max(out["data_wait_s"] + out["compute_s"], 1e-9)
        return out

