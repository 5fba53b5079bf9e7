"""compat=published end to end through the CLI: the demo suite with 256 px frames and a LeRobot
dataset with 640 x 480 frames -> tokenize -> verify -> inspect (a non-square world-model block
as PNG) -> a few training steps -> act (and imagine on the non-square world model).
Slow (VQ encoding on a CPU): `make test-all` or

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_compat_e2e.py -q -m slow
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from sim.demo_data import write_demo_suite
from lerobot_fixtures import write_lerobot_dataset

pytestmark = pytest.mark.slow
SMALL = ["--set", "image.vq_random_arch=small", "--set", "image.batch_size=16"]


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _through(raw: Path, tmp: Path, recipe: str, sets: list[str]) -> tuple[Path, Path, dict]:
    out = tmp / "out"
    _run("tokenize", "--raw", raw, "--recipe", recipe, "--out", out, "--set", "compat=published",
         *SMALL, *sets)
    shards = out / "shards"
    assert "ok" in _run("verify", shards).lower()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["compat"] == "published" and manifest["splits"]["training_split"] == "all"
    for kind in ("vla", "wm"):
        png = tmp / f"{kind}.png"
        _run("inspect", shards, "-o", png, "--kind", kind)
        assert png.stat().st_size > 0
    run = tmp / "run"
    _run("train", "--shards", shards, "--out", run, "--preset", "test", "--steps", "2",
         "--set", "batch_size=2", "--set", "eval_every=100", "--set", "save_every=2")
    return shards, run / "latest", manifest


def _frame(path: Path, h: int, w: int, seed: int) -> Path:
    np.save(path, np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


def test_demo_suite_256_px(tmp_path):
    raw = tmp_path / "raw"
    write_demo_suite(raw, tasks=2, demos=2, steps=24, size=256, seed=3)
    shards, ckpt, manifest = _through(raw, tmp_path, "demo", ["--set", "conv.chunk=3"])
    # published split: ceil(0.9 * 2) = 2 tasks in distribution, ceil(0.9 * 2) = 2 train each
    assert set(manifest["splits"]["published"].values()) == {"train"}
    state = tmp_path / "state.npy"
    np.save(state, np.zeros(8))
    out = _run("act", "--checkpoint", ckpt, "--instruction", "put the red block",
               "--state", state, "--front", _frame(tmp_path / "f.npy", 256, 256, 0),
               "--wrist", _frame(tmp_path / "w.npy", 256, 256, 1))
    assert out.strip()


def test_lerobot_640_by_480(tmp_path):
    raw = write_lerobot_dataset(tmp_path / "raw", episodes=2, frames=30, size=(480, 640))
    shards, ckpt, manifest = _through(raw, tmp_path, "so100",
                                      ["--set", "image.resolution=128", "--set", "conv.chunk=4"])
    # 640 x 480 at 128: world-model crop 128 x 96 -> 6 rows x 8 cols of codes
    assert manifest["images"]["wm_grids"] == [[6, 8]]
    assert manifest["conv"]["wm_views"] == "per_camera"
    assert set(manifest["splits"]["published"].values()) == {"train"}     # LeRobot: no split
    state = tmp_path / "state.npy"
    np.save(state, np.zeros(6))
    front, wrist = (_frame(tmp_path / f"{v}.npy", 480, 640, i) for i, v in enumerate("fw"))
    out = _run("act", "--checkpoint", ckpt, "--instruction", "pick up the red block",
               "--state", state, "--front", front, "--wrist", wrist)
    assert out.strip()
    rolled = tmp_path / "rollout"
    _run("imagine", "--checkpoint", ckpt, "--rollout", "--shards", shards, "--steps", "2",
         "-o", rolled)
    from PIL import Image
    # one camera stream: rows pred, truth of 96 x 128 frames (2 px gaps), 2 steps
    assert Image.open(rolled / "rollout_strip.png").size == (2 * 128 + 2, 2 * 96 + 2)
    from trainer.policy import Policy
    from trainer.world_model import imagine
    policy = Policy.from_checkpoint(ckpt)
    result = imagine(policy, np.load(front), np.load(wrist), np.zeros(6), state=np.zeros(6),
                     out=tmp_path / "imagined")
    assert result.codes.shape == (1, 2, 6, 8) and result.images.shape == (1, 2, 96, 128, 3)
    assert len(result.files) == 2
    report = tmp_path / "eval"
    _run("eval", "--checkpoint", ckpt, "--shards", shards, "-o", report, "--max-samples", "4",
         "--max-discrete", "1", "--max-generate", "2")
    assert (report / "wm_examples.png").exists()
