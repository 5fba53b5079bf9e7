"""The accelerator bench (`python -m bench --device cuda`) runs end to end on the CPU at toy sizes,
so its code paths cannot rot while no GPU is at hand. Run as the user runs it, from the repo
root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_device_bench_smoke_prints_one_json():
    doc = json.loads(run_python("-m", "bench", "--device", "cpu", "--smoke"))
    assert doc["device"] == "cpu" and doc["smoke"] is True
    for res in ("32px", "64px"):
        row = doc["vq"][res]
        assert row["gflop_per_image"] > 0 and 0 <= row["bf16_code_agreement"] <= 1
        assert all(row[p]["images_per_s"] > 0 for p in ("fp32", "bf16-mixed"))
    assert set(doc["train"]) == set(doc["infer"]) == {"test", "test-cut1"}
    for row in doc["train"].values():
        assert row["tokens_per_s"] > 0 and row["tflop_per_step"] > 0 and row["mfu"] is None
    for row in doc["infer"].values():
        assert row["continuous"]["actions_per_s"] > 0 and row["discrete_kv"]["actions_per_s"] > 0


def test_full_vq_flop_count_matches_the_reference():
    """The bench's counted FLOPs for the full VQ-GAN at 256 px are the documented 138 GFLOP."""
    code = ("import torch; from bench import bench_device as b; from shards import vq; "
            "h = vq.load_vq(None, random_arch='full', device='cpu'); "
            "x = torch.zeros(1, 3, 256, 256); "
            "print(b.counted_flops(lambda: vq.encode(h, x)) / 1e9 / b.REFERENCE_GFLOP[256])")
    assert abs(float(run_python("-c", code).split()[-1]) - 1) < 0.01
