"""Stages see only the config fields they declare (their cache key): every stage of every recipe
runs under `ConfigView`, which raises on an undeclared read; a toy stage shows the error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import RECIPES, ConfigView, UndeclaredField, apply_overrides, base, recipe
from sim.demo_data import write_demo_suite
from lerobot_fixtures import write_lerobot_dataset
from pipeline.runner import Result, Runner, Stage
from pipeline.workflow import make_runner

# Small images and the reduced VQ-GAN keep every recipe to seconds; the fields read are the same.
FAST = ["image.resolution=32", "image.vq_random_arch=small"]


@pytest.fixture(scope="module")
def libero_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fields") / "suite"
    write_demo_suite(root, flavour="raw", size=32, tasks=2, demos=2, steps=24, seed=2)
    return root


def _raw_for(name: str, libero_files: Path, tmp_path: Path) -> Path:
    cfg = recipe(name)
    if cfg.source.format == "lerobot":
        return write_lerobot_dataset(tmp_path / "raw", episodes=2, frames=30, size=32)
    shutil.copytree(libero_files, tmp_path / "raw" / cfg.suite)
    return tmp_path / "raw"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_stage_of_every_recipe_reads_only_declared_fields(name, libero_files, tmp_path):
    cfg = apply_overrides(recipe(name), [*FAST, "conv.chunk=2"])
    done = make_runner(cfg, _raw_for(name, libero_files, tmp_path), tmp_path / "out",
                       quiet=True).run()
    assert list(done) == ["filter", "fit-bins", "pretokenize", "shards"]


def test_an_undeclared_read_raises_naming_stage_and_field(tmp_path):
    def sneaky(ctx) -> Result:
        return Result(counts={"chunk": ctx.cfg.conv.chunk})       # declared: bins.* only
    stage = Stage("sneaky", "1", ("bins.*",), (), sneaky)
    runner = Runner(base(), [stage], raw=None, cache=tmp_path / "cache", quiet=True)
    with pytest.raises(UndeclaredField, match=r"stage 'sneaky' read config field 'conv.chunk'"):
        runner.run()
    assert not list((tmp_path / "cache" / "sneaky").glob("*/stage.json"))   # nothing published


def test_view_reads_declared_groups_and_untracked_fields_and_is_read_only():
    view = ConfigView(base(), ("conv.*", "image.device"), "s")
    assert view.conv.chunk == base().conv.chunk and view.image.device == "auto"
    with pytest.raises(UndeclaredField, match="'image.resolution'"):
        view.image.resolution
    with pytest.raises(AttributeError):
        view.conv.chunk = 3
    moved = view.image.replace(device="cpu")
    assert moved.device == "cpu" and view.image.device == "auto"
    with pytest.raises(UndeclaredField, match="'image.resolution'"):
        moved.resolution
