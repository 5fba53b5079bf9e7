"""`evaluate` writes its report and plots; metrics behave on known inputs.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import metrics
from trainer.evaluate import NOT_COMPUTED, EvalError, evaluate
from trainer.fvd import FvdError

from test_fvd import write_detector
from test_lpips import write_lpips_weights
from test_policy import build_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


def test_evaluate_writes_report(root, tmp_path):
    run, pipe = build_checkpoint(root)
    out = tmp_path / "eval"
    report = evaluate(run, pipe["shards"], out, max_samples=6, max_discrete=2, max_generate=1,
                      device="cpu")
    assert report["held_out"] and report["split"] == "val"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["samples"] == report["samples"]
    cont = report["actions"]["continuous"]
    assert len(cont["normalized"]["l1"]) == 7 and cont["normalized"]["count"] == 6 * 3
    disc = report["actions"]["discrete"]
    assert disc["samples"] == 2 and disc["normalized"]["count"] + 3 * disc["malformed"] == 6
    assert 0 <= report["actions"]["token_accuracy"]["action_bins"] <= 1
    wm = report["world_model"]
    assert wm["generated"]["images"] == 2 and wm["lpips"] == NOT_COMPUTED
    assert wm["fvd"] == NOT_COMPUTED
    assert 0 <= wm["teacher_forced"]["code_accuracy"] <= 1
    for name in ("action_l1_per_dim.png", "wm_quality.png", "wm_examples.png"):
        assert (out / name).stat().st_size > 0


def test_evaluate_with_lpips_weights(root, tmp_path):
    run, pipe = build_checkpoint(root)
    weights = write_lpips_weights(tmp_path / "lpips")
    report = evaluate(run, pipe["shards"], tmp_path / "eval", max_samples=2, max_discrete=0,
                      max_generate=2, device="cpu", lpips_weights=weights)
    lpips = report["world_model"]["lpips"]
    assert lpips["net"] == "alex" and lpips["count"] == report["world_model"]["generated"]["images"]
    assert lpips["mean"] > 0 and np.isfinite(lpips["mean"])


def test_evaluate_with_fvd_detector(root, tmp_path):
    run, pipe = build_checkpoint(root)
    detector = write_detector(tmp_path / "i3d_torchscript.pt")
    report = evaluate(run, pipe["shards"], tmp_path / "eval", max_samples=1, max_discrete=0,
                      max_generate=0, device="cpu", fvd_weights=detector, fvd_videos=2,
                      fvd_frames=2)
    fvd = report["world_model"]["fvd"]
    assert fvd["split"] == "val" and fvd["frames"] == 2
    assert fvd["videos"] == 2 * len(fvd["episodes"]) and 1 <= len(fvd["episodes"]) <= 2
    assert np.isfinite(fvd["fvd"]) and fvd["fvd"] >= -1e-9
    with pytest.raises(FvdError, match="lower --fvd-frames"):
        evaluate(run, pipe["shards"], tmp_path / "eval2", max_samples=1, max_discrete=0,
                 max_generate=0, device="cpu", fvd_weights=detector, fvd_frames=10_000)


def test_evaluate_refuses_foreign_shards(root, tmp_path):
    run, pipe = build_checkpoint(root)
    manifest = json.loads((pipe["shards"] / "manifest.json").read_text())
    manifest["vq"]["digest"] = "0" * 64
    foreign = tmp_path / "shards"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalError, match="VQ digest"):
        evaluate(run, foreign, tmp_path / "eval", device="cpu")


def test_action_errors_per_dimension():
    pred = np.array([[0.0, 1.0], [2.0, 1.0]])
    truth = np.array([[1.0, 1.0], [0.0, 1.0]])
    errs = metrics.action_errors(pred, truth)
    assert errs["l1"] == [1.5, 0.0] and errs["mse"] == [2.5, 0.0]
    running = metrics.Running()
    running.add(pred[:1], truth[:1])
    running.add(pred[1:], truth[1:])
    assert running.result()["l1"] == errs["l1"]


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert np.allclose(metrics.ssim(img, img), 1.0)
    assert np.all(metrics.psnr(img, img) == metrics.PSNR_CAP)
    shifted = np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8)
    noisy = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(img, shifted).mean() > metrics.ssim(img, noisy).mean()
    flat = np.full((1, 16, 16, 1), 100, np.uint8)
    # constant offset on a flat image: SSIM = luminance term only
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1)
    assert np.isclose(metrics.ssim(flat, flat + 20)[0], expected)
    assert np.isclose(metrics.psnr(flat, flat + 20)[0], 10 * np.log10(255 ** 2 / 400))
