"""The data pipeline: its stages in order. `pipeline()` imports them lazily."""

from __future__ import annotations

import importlib

from pipeline.runner import Stage

ORDER = ("stages.filter", "stages.fit_bins", "stages.pretokenize", "stages.shards_stage")


def pipeline() -> list[Stage]:
    return [importlib.import_module(mod).STAGE for mod in ORDER]


def names() -> list[str]:
    return [s.name for s in pipeline()]
