"""Shard sets at a URL (shards/remote.py) against a local HTTP server the tests start: the reader
gives the local reader's batches (per rank, and across a resume), every shard is sha256-checked
before use, the cache stays bounded, verify and inspect take URLs, fsspec URLs work too.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_remote_shards.py -q
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import pytest
import torch

from pipeline.errors import DataError
from shards.inspect import inspect
from shards.reader import ShardReader
from shards.remote import RemoteShardSet
from shards.verify import verify


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tiny_shards, tmp_path_factory):
    """http://127.0.0.1:PORT/good/ (a copy of the shards) and /bad/ (one shard altered)."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(tiny_shards, site / "good")
    shutil.copytree(tiny_shards, site / "bad")
    victim = sorted((site / "bad").glob("vla-*.tar.gz"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", victim.name
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RYNN_SHARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _take(reader: ShardReader, n: int) -> list[dict]:
    out = []
    for batch in reader.forever():
        out.append(batch)
        if len(out) == n:
            return out
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for k in ("input_ids", "labels", "attention_mask", "actions"):
            assert torch.equal(x[k], y[k]), k


def test_reader_from_url_equals_local_per_rank(served, tiny_shards):
    url, _ = served
    kw = dict(batch_size=2, seed=3, world_size=2, shuffle_shards=1)
    counts = []
    for rank in range(2):
        with ShardReader(tiny_shards, rank=rank, **kw) as local, \
                ShardReader(f"{url}/good", rank=rank, **kw) as remote:
            assert len(remote) == len(local)
            _same(_take(remote, len(local) + 2), _take(local, len(local) + 2))
            counts.append(len(remote))
    assert counts[0] == counts[1]                     # equal batches per rank


def test_reader_from_url_resumes_exactly(served, tiny_shards):
    url, _ = served
    kw = dict(batch_size=2, seed=1, shuffle_shards=1)
    with ShardReader(f"{url}/good", **kw) as first:
        _take(first, 3)
        state = first.state_dict()
    with ShardReader(tiny_shards, **kw) as local:
        want = _take(local, 8)[3:]
    with ShardReader(f"{url}/good", **kw) as resumed:
        resumed.load_state_dict(state)
        _same(_take(resumed, 5), want)


def test_altered_shard_is_refused_before_use(served):
    url, victim = served
    remote = RemoteShardSet(f"{url}/bad")
    with pytest.raises(DataError, match=f"differs from its manifest and was not used.*bad/{victim}"):
        with remote.local(victim):
            pass
    assert not (remote.root / victim).exists()
    report = verify(f"{url}/bad")
    assert report.problems[0].startswith(f"{victim}: ") and "was not used" in report.problems[0]
    assert [p.split(":")[0] for p in report.problems[1:]] == ["totals"]   # its samples unread
    with pytest.raises(DataError, match="was not used"):
        with ShardReader(f"{url}/bad", batch_size=2, split="all", kinds=("vla",)) as reader:
            _take(reader, 2 * len(reader))


def test_cache_stays_bounded(served, cache, monkeypatch):
    url, _ = served
    monkeypatch.setenv("RYNN_SHARD_CACHE_GB", str(1 / 1024 / 1024))      # 1 KiB: below one shard
    with ShardReader(f"{url}/good", batch_size=2, shuffle_shards=1) as reader:
        _take(reader, 2 * len(reader))
        remote = reader.shard_set.remote
    shards = len(remote.entries)
    assert remote.downloads > shards                   # evicted shards were fetched again
    assert remote.cached_bytes() <= remote.max_bytes
    left = [p for p in remote.root.iterdir() if p.name.endswith(".tar.gz")]
    assert left == []


def test_cache_is_reused_between_readers(served):
    url, _ = served
    first = RemoteShardSet(f"{url}/good")
    names = sorted(first.entries)
    for name in names:
        with first.local(name):
            pass
    second = RemoteShardSet(f"{url}/good")
    for name in names:
        with second.local(name):
            pass
    assert first.downloads == len(names) and second.downloads == 0


def test_verify_and_inspect_take_urls(served, tiny_shards, tmp_path):
    url, _ = served
    report = verify(f"{url}/good")
    assert report.problems == [] and report.summary() == verify(tiny_shards).summary()
    png = inspect(f"{url}/good", tmp_path / "s.png", index=1, kind="wm")
    assert png.stat().st_size > 0
    from typer.testing import CliRunner
    from pipeline.cli import app
    result = CliRunner().invoke(app, ["verify", f"{url}/good"])
    assert result.exit_code == 0 and "OK" in result.output, result.output
    result = CliRunner().invoke(app, ["verify", f"{url}/bad"])
    assert result.exit_code == 1 and "was not used" in result.output


def test_fsspec_url_and_missing_set(served, tiny_shards):
    url, _ = served
    kw = dict(batch_size=2, seed=0)
    with ShardReader(tiny_shards.resolve().as_uri(), **kw) as via_fsspec, \
            ShardReader(tiny_shards, **kw) as local:
        _same(_take(via_fsspec, 3), _take(local, 3))
    with pytest.raises(DataError, match="cannot fetch"):
        RemoteShardSet(f"{url}/nothing-here")


def test_train_from_a_url_equals_training_from_the_directory(served, tiny_shards, tmp_path):
    from trainer.config import resolve_train_config
    from trainer.train import train
    url, _ = served
    cfg = resolve_train_config("test", ["batch_size=2", "log_every=1", "eval_every=2",
                                        "eval_batches=1"], steps=3)
    rows = []
    for shards, run in ((f"{url}/good", tmp_path / "url"), (tiny_shards, tmp_path / "dir")):
        train(cfg, shards, run)
        rows.append((run / "metrics.jsonl").read_text().splitlines())
    strip = [[{k: v for k, v in json.loads(r).items() if not k.endswith("_s")}   # no timings
              for r in rs] for rs in rows]
    assert strip[0] == strip[1] and any("val_loss" in r for r in strip[0])
