"""Trainer and inference misuse as a user meets it through the CLI: numbers stay finite, damaged
checkpoints and inputs give one line naming the file, resume bookkeeping writes every metrics row
once and cleans up after a killed save.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_integrity_train.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from trainer import checkpoint as ckpt

BASE = ("log_every=1", "eval_every=2", "save_every=2", "keep_last=2", "batch_size=2",
        "warmup_steps=1")


def cli(*args: str):
    from pipeline.cli import app
    return CliRunner().invoke(app, list(args))


def train_cli(shards: Path, run: Path, steps: int, *sets: str, resume: bool = False):
    args = ["train", "--shards", str(shards), "--out", str(run), "--preset", "test",
            "--steps", str(steps), *[a for s in (*BASE, *sets) for a in ("--set", s)]]
    return cli(*args, *(["--resume"] if resume else []))


def one_error_line(result) -> str:
    """The result failed with exactly one `error:` line and no traceback; returns it."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    result = train_cli(tiny_shards, run, 4)
    assert result.exit_code == 0, result.output
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# Numbers stay finite.
# ---------------------------------------------------------------------------------------------

def test_infinite_lr_is_a_config_error(tiny_shards, tmp_path):
    line = one_error_line(train_cli(tiny_shards, tmp_path / "run", 2, "lr=inf"))
    assert "lr" in line and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_before_anything_is_saved(tiny_shards, tmp_path, monkeypatch):
    from trainer.model import RynnModel
    real = RynnModel.forward

    def diverging(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return out._replace(logits=out.logits * float("nan"))    # a diverged network

    monkeypatch.setattr(RynnModel, "forward", diverging)
    line = one_error_line(train_cli(tiny_shards, tmp_path / "run", 4))
    assert "not finite" in line and "step 0" in line
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.parametrize("damage", ["nan", "header", "truncated", "flip", "nan-unsummed"])
def test_damaged_weights_are_refused_naming_the_file(finished_run, tmp_path, damage):
    run = copy_run(finished_run, tmp_path)
    weights_path = ckpt.latest(run) / "model.safetensors"
    if damage == "nan-unsummed":          # a checkpoint without checksums.json: tensors checked
        (ckpt.latest(run) / ckpt.CHECKSUMS).unlink()
    if damage == "flip":                  # one bit of a tensor's data: finite, but not the weights
        data = bytearray(weights_path.read_bytes())
        data[-5] ^= 0x01
        weights_path.write_bytes(bytes(data))
    elif damage.startswith("nan"):
        weights = load_file(str(weights_path))
        name = sorted(weights)[0]
        weights[name] = weights[name].clone().fill_(float("nan"))
        save_file(weights, str(weights_path))
    elif damage == "header":
        data = bytearray(weights_path.read_bytes())
        data[10] ^= 0xFF
        weights_path.write_bytes(bytes(data))
    else:
        weights_path.write_bytes(weights_path.read_bytes()[:-100])
    line = one_error_line(cli("act", "--checkpoint", str(ckpt.latest(run)), "--instruction", "x",
                              "--state", ",".join(["0"] * 8), "--front", "f.npy",
                              "--wrist", "w.npy"))
    assert "model.safetensors" in line


def test_missing_config_json_is_one_line(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (ckpt.latest(run) / "config.json").unlink()
    line = one_error_line(cli("act", "--checkpoint", str(ckpt.latest(run)), "--instruction", "x",
                              "--state", "0", "--front", "f.npy", "--wrist", "w.npy"))
    assert "config.json" in line


def test_processor_json_not_json_is_one_line(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (ckpt.latest(run) / "processor.json").write_text("{not json")
    line = one_error_line(cli("act", "--checkpoint", str(ckpt.latest(run)), "--instruction", "x",
                              "--state", "0", "--front", "f.npy", "--wrist", "w.npy"))
    assert "processor.json" in line


# ---------------------------------------------------------------------------------------------
# One-line errors for bad inputs.
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def frames(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, shape in (("front", (32, 32, 3)), ("wrist", (32, 32, 3)), ("small", (16, 16, 3))):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], np.zeros(shape, np.uint8))
    paths["text"] = tmp_path / "frame.png"
    paths["text"].write_text("not a png")
    paths["pickle"] = tmp_path / "pickled.npy"
    np.save(paths["pickle"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return paths


def _act(run: Path, state: str, front: Path, wrist: Path):
    return cli("act", "--checkpoint", str(ckpt.latest(run)), "--instruction", "pick",
               "--state", state, "--front", str(front), "--wrist", str(wrist))


@pytest.mark.parametrize("case", ["state_text", "missing_npy", "not_png", "pickled", "sizes"])
def test_act_input_errors_are_one_line(finished_run, frames, case):
    state = ",".join(["0.1"] * 8)
    front, wrist = frames["front"], frames["wrist"]
    expect = {"state_text": "--state", "missing_npy": "gone.npy", "not_png": "frame.png",
              "pickled": "pickled.npy", "sizes": "differ in size"}[case]
    if case == "state_text":
        state = "1,2,x"
    elif case == "missing_npy":
        front = frames["front"].parent / "gone.npy"
    elif case == "not_png":
        front = frames["text"]
    elif case == "pickled":
        front = frames["pickle"]
    else:
        wrist = frames["small"]
    assert expect in one_error_line(_act(finished_run, state, front, wrist))


@pytest.mark.parametrize("option", ["eval_every=0", "save_every=0", "log_every=0"])
def test_zero_intervals_are_config_errors(tiny_shards, tmp_path, option):
    result = train_cli(tiny_shards, tmp_path / "run", 2, option)
    assert option.split("=")[0] in one_error_line(result) and result.exit_code == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, field", [
    (("conv.relative_action_dims=a,b",), "conv.relative_action_dims"),
    (("image.device=bogus",), "image.device"),
])
def test_bad_tokenize_options_are_one_line(tmp_path, sets, field):
    args = ["tokenize", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]
    result = cli(*args, *[a for s in sets for a in ("--set", s)])
    assert field in one_error_line(result) and result.exit_code == 2


def test_workers_zero_is_a_config_error(tmp_path):
    result = cli("tokenize", "--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0")
    assert "image.workers" in one_error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_one_line(tmp_path):
    from sim.demo_data import write_demo_suite
    write_demo_suite(tmp_path / "raw", tasks=1, demos=1, steps=24, seed=1)
    result = cli("tokenize", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                 "--set", "image.device=cuda", "--set", "image.resolution=32",
                 "--set", "image.vq_random_arch=small")
    assert "image.device=cuda" in one_error_line(result)


def test_training_on_a_corrupt_shard_is_one_line(tiny_shards, tmp_path):
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    shard = sorted(shards.glob("vla-*.tar.gz"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert shard.name in one_error_line(train_cli(shards, tmp_path / "run", 2))


def test_training_while_the_set_is_reexported_is_one_line(tiny_shards, tmp_path, monkeypatch):
    import trainer.train as loop
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    real = loop.train_step

    def step_then_reexport(*args, **kwargs):
        out = real(*args, **kwargs)
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["conv"]["chunk"] += 1                    # another chunk, as a re-export writes
        (shards / "manifest.json").write_text(json.dumps(manifest))
        return out

    monkeypatch.setattr(loop, "train_step", step_then_reexport)
    assert "re-exported" in one_error_line(train_cli(shards, tmp_path / "run", 4))


def test_training_reads_the_version_it_started_on_while_the_set_is_reexported(
        tiny_shards, tmp_path, monkeypatch):
    import trainer.train as loop
    from pipeline.publish import export
    from pipeline.workflow import resolve_config, tokenize
    from trainer.card import read_card, resolve_checkpoint
    other = tmp_path / "other"
    tokenize(resolve_config("demo", ["image.resolution=32", "image.vq_random_arch=small",
                                     "conv.chunk=4"]),
             tiny_shards.parent.parent / "raw", other, quiet=True)
    dst = tmp_path / "out" / "shards"
    export(tiny_shards, dst)                              # chunk 3
    first = dst.parent / os.readlink(dst)
    real, kept = loop.train_step, []

    def step_then_reexport(*args, **kwargs):
        out = real(*args, **kwargs)
        if not kept:
            export(other / "shards", dst)                 # another chunk, mid-run
            kept.append(first.is_dir())                   # held by the run: not removed
        return out

    monkeypatch.setattr(loop, "train_step", step_then_reexport)
    result = train_cli(dst, tmp_path / "run", 4)
    assert result.exit_code == 0, result.output
    assert kept == [True] and dst.parent / os.readlink(dst) != first
    assert read_card(resolve_checkpoint(tmp_path / "run")).chunk == 3   # what it started on
    assert json.loads((dst / "manifest.json").read_text())["conv"]["chunk"] == 4
    export(other / "shards", dst)                         # the next export removes the old one
    assert not first.exists()


def test_errors_do_not_wrap_when_output_is_not_a_terminal(tmp_path):
    long = tmp_path / ("a-very-long-directory-name-" * 6)
    line = one_error_line(cli("train", "--shards", str(long), "--out", str(tmp_path / "run")))
    assert str(long) in line


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping.
# ---------------------------------------------------------------------------------------------

def test_resume_with_another_batch_size_or_seed_is_one_line(finished_run, tiny_shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    line = one_error_line(train_cli(tiny_shards, run, 6, "batch_size=3", resume=True))
    assert "batch_size" in line
    line = one_error_line(train_cli(tiny_shards, run, 6, "seed=4", resume=True))
    assert "seed" in line


def test_resuming_a_finished_run_is_a_no_op(finished_run, tiny_shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    result = train_cli(tiny_shards, run, 4, resume=True)
    assert result.exit_code == 0 and "already finished" in result.output
    assert (run / "metrics.jsonl").read_bytes() == before


def _unique(run: Path) -> None:
    keys = [(r["step"], "loss" in r) for r in rows(run)]
    assert len(keys) == len(set(keys)), keys


def test_a_row_logged_after_the_last_save_is_written_once(tiny_shards, tmp_path):
    from trainer.config import resolve_train_config
    from trainer.train import train
    full = tmp_path / "full"
    cfg = resolve_train_config("test", list(BASE), steps=4)
    train(cfg, tiny_shards, full)
    part = tmp_path / "part"
    train(replace(cfg, steps=2), tiny_shards, part)                # stopped at step 2
    assert "val_loss" in rows(part)[-1]            # the held-out row logged after the step-2 save
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                                  # a kill's torn last line
    (part / ".tmp-step-000004-999").mkdir()                         # a killed save's debris
    (part / ".tmp-latest.abc").write_text("step")
    result = train_cli(tiny_shards, part, 4, resume=True)
    assert result.exit_code == 0, result.output
    _unique(part)
    assert [r["step"] for r in rows(part)] == [r["step"] for r in rows(full)]
    assert not list(part.glob(".tmp-*"))


def test_read_jsonl_names_a_damaged_line_and_drops_only_a_torn_tail(tmp_path):
    """The one JSONL reader (metrics.jsonl, episodes.jsonl, LeRobot metadata)."""
    from pipeline.errors import BadJSON
    from pipeline.io import read_jsonl
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path, torn_tail=True) == [{"step": 1}, {"step": 2}]
    with pytest.raises(BadJSON, match="line 4") as err:
        read_jsonl(path)
    assert str(path) in str(err.value)
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')        # damage before the end: an error
    with pytest.raises(BadJSON, match="line 2"):
        read_jsonl(path, torn_tail=True)
