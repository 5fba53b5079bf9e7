"""The VQ-GAN encoder's batch size: measured once per device, resolution, architecture and
precision, remembered in `$RYNN_HOME/tuning/vq_batch.json`, overridable by `image.batch_size`.

    from stages.vq_batch import best_batch_size, sweep
    size, how = best_batch_size(handle, resolution=256, precision="fp32")   # e.g. (16, "measured")
    rates = sweep(handle, 256, "fp32", sizes=(1, 4, 16))                      # {batch: images/s}

The measurement encodes random images at growing batch sizes (1, 2, 4, ...); it stops at the
device's largest candidate, when a size is clearly slower than the best, on running out of device
memory, or after `MEASURE_S` seconds; a second round over the sizes reached keeps each size's
best rate (the machine may be busy), and the fastest size wins. Which batch size is used never
changes the codes (batches never cross an episode and each image is encoded independently), so
the choice is not part of any cache key. Without `RYNN_HOME` the file goes under
`$XDG_CACHE_HOME/rynn-pipe` (default `~/.cache/rynn-pipe`).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from pipeline.config import digest
from pipeline.io import read_json, write_json
from shards.vq import encode

TUNING_FILE = "tuning/vq_batch.json"
SCHEMA = 1
CANDIDATES = {"cpu": (1, 2, 4, 8, 16, 32), "cuda": (1, 2, 4, 8, 16, 32, 64, 128)}
MEASURE_S = 8.0        # total measuring time budget (a size started is finished)
SLOWER = 0.8           # stop once a size runs below this fraction of the best rate


def home() -> Path:
    """`$RYNN_HOME`, else `$XDG_CACHE_HOME/rynn-pipe` (default `~/.cache/rynn-pipe`)."""
    if os.environ.get("RYNN_HOME"):
        return Path(os.environ["RYNN_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rynn-pipe"


def device_name(device: torch.device) -> str:
    """What the speed depends on: the GPU model, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{_cpu_model()}:{torch.get_num_threads()}t"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tuning_key(handle, resolution: int, precision: str) -> str:
    arch = digest(handle.arch)[:12]
    return f"{device_name(handle.device)}|{resolution}px|arch-{arch}|{precision}"


def sweep(handle, resolution: int, precision: str, sizes: Sequence[int] | None = None,
          budget_s: float = MEASURE_S, rounds: int = 2) -> dict[int, float]:
    """Images/s of `encode` at each batch size (in order) until a stop rule fires (module doc),
    then further rounds over the sizes reached, keeping each size's best (a busy machine)."""
    sizes = sizes or CANDIDATES.get(handle.device.type, CANDIDATES["cpu"])
    gen = torch.Generator().manual_seed(0)
    batches = {}
    rates: dict[int, float] = {}
    start = time.perf_counter()
    for size in sizes:
        batches[size] = torch.rand(size, 3, resolution, resolution, generator=gen) * 2 - 1
        try:
            rates[size] = _rate(handle, batches[size], precision, encode)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if rates[size] < SLOWER * max(rates.values()) or time.perf_counter() - start > budget_s:
            break
    for _ in range(rounds - 1):
        for size in list(rates):
            if time.perf_counter() - start > 2 * budget_s:
                return rates
            rates[size] = max(rates[size], _rate(handle, batches[size], precision, encode))
    return rates


def _rate(handle, pixels: torch.Tensor, precision: str, encode) -> float:
    """Images/s of one batch after a warm-up call (repeated until 0.2 s have passed)."""
    encode(handle, pixels, precision=precision)
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < 0.2:
        encode(handle, pixels, precision=precision)   # returns codes on the CPU: synchronized
        calls += 1
    return calls * len(pixels) / (time.perf_counter() - t0)


def best_batch_size(handle, resolution: int, precision: str, *,
                    path: Path | None = None) -> tuple[int, str]:
    """(batch size, "remembered" | "measured"): the fastest measured size for this key."""
    path = path or home() / TUNING_FILE
    key = tuning_key(handle, resolution, precision)
    known = _read(path)
    if key in known:
        return int(known[key]["batch_size"]), "remembered"
    rates = sweep(handle, resolution, precision)
    size = max(rates, key=rates.get)
    known = _read(path)                       # another process may have written meanwhile
    known[key] = {"batch_size": size,
                  "images_per_s": {str(b): round(r, 2) for b, r in rates.items()}}
    write_json(path, {"schema": SCHEMA, "entries": known})
    return size, "measured"


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    doc = read_json(path)
    return dict(doc.get("entries", {})) if doc.get("schema") == SCHEMA else {}
