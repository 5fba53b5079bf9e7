"""Shared pytest fixtures: small synthetic LIBERO suites (sim.demo_data), written once per run.

    def test_something(demo_suite, demo_suite_regen): ...   # directories of *_demo.hdf5 files

Both are session-scoped and shared: treat them as read-only (copy a file before breaking it).
raw flavour: 2 tasks x 3 demos (demo_0..demo_2), 128 px, 40-60 steps with idle no-op pauses,
attributes on `data`, obs recorded after the action. regenerated flavour: the same tasks with
`<ROOM>_SCENE<n>_` file-name prefixes, demo numbers with gaps, no attributes, no idle steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.demo_data import write_demo_suite

SUITE = {"size": 128, "tasks": 2, "demos": 3, "seed": 0}


@pytest.fixture(scope="session", autouse=True)
def private_rynn_home(tmp_path_factory):
    """Measured batch sizes (stages/vq_batch.py) go to a per-session directory, not $HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RYNN_HOME", raising=False)
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(scope="session")
def demo_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_suite") / "raw"
    write_demo_suite(root, flavour="raw", **SUITE)
    return root


@pytest.fixture(scope="session")
def demo_suite_regen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_suite") / "regenerated"
    write_demo_suite(root, flavour="regenerated", **SUITE)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Real shards from the real pipeline on a tiny demo suite (32 px, small random VQ-GAN)."""
    from pipeline.workflow import resolve_config, tokenize
    root = tmp_path_factory.mktemp("tiny_shards")
    write_demo_suite(root / "raw", tasks=2, demos=3, steps=24, seed=5)
    cfg = resolve_config("demo", ["image.resolution=32", "image.vq_random_arch=small",
                                  "conv.chunk=3"])
    tokenize(cfg, root / "raw", root / "out", quiet=True)
    return root / "out" / "shards"
