"""Configs and recipes: every recipe builds, per-suite values, overrides, suite directories."""

from __future__ import annotations

import pytest

from pipeline.config import ALIASES, RECIPES, ConfigError, apply_overrides, recipe, select
from pipeline.workflow import raw_root
from trainer.config import PRESETS, resolve_train_config

# SPEC.md 6: chunk K per suite; history M=2; 256 px.
EXPECTED_K = {"libero_spatial": 10, "libero_object": 5, "libero_goal": 5, "libero_10": 10,
              "libero_long": 10}


@pytest.mark.parametrize("name", [*RECIPES, *ALIASES])
def test_every_recipe_builds_and_validates(name):
    cfg = recipe(name)
    assert cfg.recipe == name
    assert select(cfg, ("conv.*", "image.*", "source.*"))          # every field is addressable


@pytest.mark.parametrize("name,k", EXPECTED_K.items())
def test_libero_suites_carry_the_paper_values(name, k):
    cfg = recipe(name)
    assert (cfg.conv.chunk, cfg.conv.history, cfg.image.resolution) == (k, 2, 256)
    assert cfg.source.rotate_180
    assert cfg.suite == ("libero_10" if name in ("libero_10", "libero_long") else name)


def test_so100_recipe():
    cfg = recipe("so100")
    assert (cfg.conv.chunk, cfg.conv.history) == (20, 1)
    assert cfg.conv.relative_action_dims == (0, 1, 2, 3, 4) and cfg.conv.drop_static_chunks
    assert cfg.source.format == "lerobot" and not cfg.source.rotate_180


def test_overrides_parse_types_and_refuse_bad_values():
    cfg = apply_overrides(recipe("demo"), ["conv.chunk=7", "image.vq_path=/w/vq",
                                           "filter.enabled=false", "conv.relative_action_dims=0,2"])
    assert cfg.conv.chunk == 7 and cfg.image.vq_path == "/w/vq" and not cfg.filter.enabled
    assert cfg.conv.relative_action_dims == (0, 2)
    for bad, msg in [("conv.chunk=0", "conv.chunk"), ("conv.nope=1", "unknown option"),
                     ("conv=3", "is a group"), ("image.precision=fp8", "choose one of"),
                     ("conv.chunk", "key=value"), ("bins.num_bins=1000", "bins.num_bins")]:
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(recipe("demo"), [bad])
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe("libero_100")


@pytest.mark.parametrize("folder", ["libero_10", "libero_10_no_noops"])
def test_suite_directory_under_a_data_root(tmp_path, folder):
    (tmp_path / folder).mkdir()
    assert raw_root(tmp_path, recipe("libero_long")) == tmp_path / folder
    assert raw_root(tmp_path / folder, recipe("libero_long")) == tmp_path / folder


@pytest.mark.parametrize("name", PRESETS)
def test_every_trainer_preset_resolves(name):
    cfg = resolve_train_config(name, ["batch_size=2"], steps=5)
    assert cfg.model.name == name and cfg.steps == 5 and cfg.batch_size == 2
