"""`python -m bench --device cuda` (`make bench-gpu`): the accelerator figures in one JSON.

One command, a few minutes on one GPU, one JSON on stdout (progress on stderr):
- vq: the full-size VQ-GAN (random init, Chameleon's architecture) encoding at 256 and 512 px in
  fp32 and bf16-mixed: images/s, achieved TFLOP/s against the device's peak for that precision
  (FLOPs counted by torch's FlopCounterMode; the reference is 138 GFLOP per 256 px image and 554
  at 512), bf16-mixed code agreement with fp32, peak memory;
- train: one optimizer step (bf16 autocast, AdamW, the trainer's own `train_step`) of the `small`
  preset and of a 7B-shaped model (Chameleon-7B widths) cut to a few layers, on batches of the
  shards' layout at 256 px (about 1.2k tokens per sample): tokens/s, TFLOP/s, model FLOP
  utilization (counted FLOPs of a step / step time / bf16 peak), peak memory;
- infer: at those two shapes (bf16 weights on a GPU), actions/s of the continuous head vs discrete
  decoding with the KV cache (trainer.policy, as `bench infer` times on the CPU), peak memory.

Timings synchronize the device before reading the clock and follow warm-up calls. Peaks are the
dense figures of the device (`PEAK_TFLOPS`, H100/H200 SXM) or `--peak-bf16/--peak-fp32` in TFLOP/s;
fp32 convolutions may use TF32 (torch's default `cudnn.allow_tf32`), reported beside the figures.

    python -m bench --device cuda                 # make bench-gpu
    python -m bench --device cpu --smoke          # the same code paths at toy sizes (a test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from bench.bench_reader import D, K

# Dense TFLOP/s by device name fragment (NVIDIA data sheets, SXM parts, no sparsity).
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0},
               "H100": {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0},
               "A100": {"bf16": 312.0, "fp32": 19.5, "tf32": 156.0}}
REFERENCE_GFLOP = {256: 138.0, 512: 554.0}   # full VQ-GAN encode per image (LIBRARY_NOTES.md)


@dataclass(frozen=True, kw_only=True)
class Sizes:
    vq_arch: str
    vq_batches: dict[int, int]      # resolution -> batch size
    models: dict[str, Any]          # name -> trainer ModelConfig
    train_batch: int
    train_steps: int
    image_px: int                   # training samples and inference prompts: images of this size
    min_time_s: float               # each timing runs at least this long (and >= 2 calls)


def full_sizes() -> Sizes:
    from trainer.config import PRESETS
    cut = replace(PRESETS["7b"], name="7b-cut4", layers=4, gradient_checkpointing=False)
    return Sizes(vq_arch="full", vq_batches={256: 64, 512: 16},
                 models={"small": PRESETS["small"], "7b-cut4": cut}, train_batch=8,
                 train_steps=5, image_px=256, min_time_s=2.0)


def smoke_sizes() -> Sizes:
    from trainer.config import PRESETS
    cut = replace(PRESETS["test"], name="test-cut1", layers=1)
    return Sizes(vq_arch="small", vq_batches={32: 2, 64: 2},
                 models={"test": PRESETS["test"], "test-cut1": cut}, train_batch=2,
                 train_steps=1, image_px=32, min_time_s=0.0)


# ---------------------------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, min_time_s: float,
          warmup: int = 1) -> float:
    """Seconds per call: `warmup` untimed calls, then calls until min_time_s (at least 2)."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < min_time_s:
        fn()
        calls += 1
    sync(device)
    return (time.perf_counter() - t0) / calls


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since `reset_peak` (None on a CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peaks(device: torch.device, args) -> dict[str, float | None]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    table = next((v for k, v in PEAK_TFLOPS.items() if k in name), {})
    return {"bf16": args.peak_bf16 or table.get("bf16"),
            "fp32": args.peak_fp32 or table.get("fp32"),
            "tf32": table.get("tf32")}


def utilization(tflops: float, peak: float | None) -> float | None:
    return None if not peak else round(tflops / peak, 4)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------

def vq_section(device: torch.device, sizes: Sizes, peak: dict) -> dict[str, Any]:
    from shards import vq
    handle = vq.load_vq(None, random_arch=sizes.vq_arch, seed=0, device=device)
    out: dict[str, Any] = {"arch": sizes.vq_arch,
                           "tf32_convolutions": torch.backends.cudnn.allow_tf32}
    gen = torch.Generator().manual_seed(0)
    for res, batch in sizes.vq_batches.items():
        x = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
        per_image = counted_flops(lambda: vq.encode(handle, x[:1])) / 1e9
        row: dict[str, Any] = {"batch": batch, "gflop_per_image": round(per_image, 1),
                               "reference_gflop_per_image": REFERENCE_GFLOP.get(res)}
        for precision in vq.PRECISIONS:
            reset_peak(device)
            s = timed(lambda: vq.encode(handle, x, precision=precision), device, sizes.min_time_s)
            tflops = batch / s * per_image / 1e3
            key = "bf16" if precision == "bf16-mixed" else "fp32"
            row[precision] = {"images_per_s": round(batch / s, 2), "tflops": round(tflops, 2),
                              "of_peak": utilization(tflops, peak[key]),
                              "peak_gib": peak_gib(device)}
            log(f"vq {res}px {precision}: {batch / s:.1f} images/s, {tflops:.2f} TFLOP/s")
        row["bf16_code_agreement"] = round(vq.agreement(handle, x), 4)
        out[f"{res}px"] = row
    return out


def train_batch(batch: int, side_px: int, seed: int = 0) -> dict[str, Any]:
    """A collated batch of the shards' layout, half VLA, half world model (bench_reader's
    synthetic samples: about 1.2k tokens each at 256 px)."""
    from bench.bench_reader import vla_sequence, wm_sequence
    from shards.reader import Sample, collate
    rng = np.random.default_rng(seed)
    is_vla = np.arange(batch) % 2 == 0
    samples = []
    for i, vla in enumerate(is_vla):
        tokens, targets = (vla_sequence if vla else wm_sequence)(rng, side_px)
        chunk = rng.uniform(-1, 1, (K, D)).astype(np.float32) if vla else None
        samples.append(Sample(f"s{i}", tokens, targets, chunk, "train"))
    return collate(samples, is_vla, (K, D), 8)


def build(model_cfg, device: torch.device):
    from trainer.model import RynnModel
    torch.manual_seed(0)
    with torch.device(device):
        return RynnModel(model_cfg, chunk=K, action_dim=D)


def train_section(name: str, model_cfg, device: torch.device, sizes: Sizes, peak: dict):
    """(figures, the trained model) for one shape."""
    from trainer.config import TrainConfig
    from trainer.loss import Loss
    from trainer.train import build_optimizer, train_step
    cfg = TrainConfig(model=model_cfg, batch_size=sizes.train_batch, precision="bf16",
                      warmup_steps=1, steps=1000)
    reset_peak(device)
    model = build(model_cfg, device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, cfg)
    batch = train_batch(sizes.train_batch, sizes.image_px)
    tokens = int(batch["attention_mask"].sum())

    def run() -> None:
        train_step(cfg, model, Loss(cfg.loss), opt, itertools.repeat(batch), 1, device)
    flops = counted_flops(run)
    s = timed(run, device, sizes.min_time_s, warmup=1)
    s = min(s, _steps_time(run, device, sizes.train_steps))
    tflops = flops / s / 1e12
    row = {"params_m": round(params / 1e6, 1), "layers": model_cfg.layers,
           "hidden": model_cfg.hidden, "batch": sizes.train_batch,
           "tokens_per_step": tokens, "step_s": round(s, 4), "tokens_per_s": round(tokens / s, 1),
           "tflop_per_step": round(flops / 1e12, 3), "tflops": round(tflops, 2),
           "mfu": utilization(tflops, peak["bf16"]), "peak_gib": peak_gib(device)}
    log(f"train {name}: {tokens / s:.0f} tokens/s, {tflops:.2f} TFLOP/s")
    return row, model


def _steps_time(run, device: torch.device, steps: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - t0) / steps


def infer_section(name: str, model, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    from bench.bench_infer import continuous, discrete, prompt
    from trainer.policy import Backend
    model = model.eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    backend = Backend(model, device)
    ids = prompt(np.random.default_rng(0), sizes.image_px)
    row: dict[str, Any] = {"prompt_tokens": len(ids), "chunk": K, "weights": str(backend.dtype)}
    for mode, fn in (("continuous", lambda: continuous(backend, ids)),
                     ("discrete_kv", lambda: discrete(backend, ids, K, True))):
        reset_peak(device)
        s = timed(fn, device, sizes.min_time_s)
        row[mode] = {"chunks_per_s": round(1 / s, 2), "actions_per_s": round(K / s, 1),
                     "peak_gib": peak_gib(device)}
    row["continuous_over_discrete"] = round(row["continuous"]["actions_per_s"]
                                            / row["discrete_kv"]["actions_per_s"], 2)
    log(f"infer {name}: continuous {row['continuous']['actions_per_s']} vs discrete+kv "
        f"{row['discrete_kv']['actions_per_s']} actions/s")
    return row


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the code paths only")
    p.add_argument("--peak-bf16", type=float, help="device bf16 dense peak, TFLOP/s")
    p.add_argument("--peak-fp32", type=float, help="device fp32 peak, TFLOP/s")
    p.add_argument("--skip", nargs="*", default=[], choices=["vq", "train", "infer"])
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench --device cuda: no CUDA device visible to torch")
    sizes = smoke_sizes() if args.smoke else full_sizes()
    peak = peaks(device, args)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "smoke": args.smoke, "peak_tflops": peak,
        "threads": torch.get_num_threads()}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True        # fixed shapes: pick the fastest kernels
    if "vq" not in args.skip:
        doc["vq"] = vq_section(device, sizes, peak)
    doc["train"], doc["infer"] = {}, {}
    for name, model_cfg in sizes.models.items():
        if "train" in args.skip and "infer" in args.skip:
            break
        row, model = train_section(name, model_cfg, device, sizes, peak)
        if "train" not in args.skip:
            doc["train"][name] = row
        if "infer" not in args.skip:
            doc["infer"][name] = infer_section(name, model, device, sizes)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    return doc


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse(argv or [])), indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
