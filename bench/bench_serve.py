"""Bench `serve`: the policy server's round-trip latency and calls/s against the in-process call.

A checkpoint of the trainer's own RynnModel (random init, `tiny` preset) on shards the real
pipeline builds from a small demo suite (128 px frames, small random VQ-GAN, history 2, K=5).
It times, on loopback (127.0.0.1), continuous-mode `act` with four raw frames and the state, the
calls of each kind interleaved so that they see the same machine load:
- in process: `Policy.act` (VQ encode + one forward + the head), the baseline;
- remote: `RemotePolicy.act` through `rynn-pipe serve`'s server (msgpack over a websocket);
- transport alone: a `card` request (no model work), and the act's own time on the server's
  inference thread (the reply's `seconds`), which splits the remote latency into its parts;
- throughput: 4 clients calling at once (the server runs requests one at a time) vs in process.

    python -m bench serve                 # or: python -m bench.bench_serve --calls 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from sim.demo_data import write_demo_suite
from pipeline.workflow import resolve_config, tokenize
from trainer.checkpoint import processor_card, save
from trainer.config import resolve_train_config
from trainer.model import RynnModel
from trainer.policy import Policy
from trainer.serve import PolicyServer, RemotePolicy, ServeConfig, pack
from trainer.train import build_optimizer

RES, K = 128, 5


def build(root: Path) -> tuple[Path, dict]:
    """Demo suite -> shards -> an untrained `tiny` checkpoint; one raw observation."""
    write_demo_suite(root / "raw", flavour="raw", size=RES, tasks=1, demos=2, seed=0, steps=24)
    cfg = resolve_config("demo", [f"image.resolution={RES}", "image.vq_random_arch=small",
                                  f"conv.chunk={K}", "image.device=cpu"])
    tokenize(cfg, root / "raw", root / "out", quiet=True)
    train_cfg = resolve_train_config("tiny")
    model = RynnModel(train_cfg.model, chunk=K, action_dim=7).eval()
    save(root / "run", 0, model, build_optimizer(model, train_cfg), {"step": 0}, train_cfg,
         processor_card(root / "out" / "shards"), keep_last=1)
    (task,) = sorted((root / "raw").glob("*.hdf5"))
    with h5py.File(task, "r") as f:
        obs = f["data"]["demo_0"]["obs"]
        state = np.concatenate([obs["ee_pos"][5], obs["ee_ori"][5], obs["gripper_states"][5]])
        inputs = {"instruction": "put the block in the bowl", "state": state,
                  "front": obs["agentview_rgb"][5], "wrist": obs["eye_in_hand_rgb"][5],
                  "prev_front": obs["agentview_rgb"][4], "prev_wrist": obs["eye_in_hand_rgb"][4]}
    return root / "run", inputs


def latencies(fns: list, calls: int) -> list[list[float]]:
    """Seconds per call of each function, calls interleaved (one of each in turn) so that all
    see the same machine load; one warm-up call each first."""
    for fn in fns:
        fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, times in zip(fns, out):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return out


def throughput(url: str, inputs: dict, clients: int, calls: int) -> float:
    """Calls per second with `clients` connections calling at once."""
    remotes = [RemotePolicy(url) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(remote: RemotePolicy) -> None:
        barrier.wait()
        for _ in range(calls):
            remote.act(**inputs)

    threads = [threading.Thread(target=work, args=(r,)) for r in remotes]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for r in remotes:
        r.close()
    return clients * calls / seconds


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.bench_serve")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run, inputs = build(Path(tmp))
        policy = Policy.from_checkpoint(run, device="cpu")
        server = PolicyServer(policy, ServeConfig(port=0)).start()
        served: list[float] = []
        with RemotePolicy(server.url) as remote:
            np.testing.assert_array_equal(remote.act(**inputs), policy.act(**inputs))

            def server_side() -> None:
                served.append(remote.request("act", {**inputs, "mode": "continuous"})["seconds"])

            local, far, _ = latencies([lambda: policy.act(**inputs), lambda: remote.act(**inputs),
                                       server_side], args.calls)
            bare = latencies([lambda: remote.request("card")], args.calls)[0]
        calls_remote = throughput(server.url, inputs, clients=4, calls=max(2, args.calls // 4))
        calls_local = 1 / statistics.median(latencies([lambda: policy.act(**inputs)], 4)[0])
        server.stop()
    med_local, med_far, med_bare = (statistics.median(x) * 1e3 for x in (local, far, bare))
    payload = len(pack({"id": 0, "method": "act", "args": {**inputs, "mode": "continuous"}}))
    print(f"payload per act request: {payload / 1024:.0f} KiB (4 frames {RES} px + state)")
    print(f"in-process act: median {med_local:.1f} ms, {1e3 / med_local:.1f} calls/s (baseline)")
    print(f"remote act over loopback: median {med_far:.1f} ms -> latency ratio "
          f"{med_far / med_local:.2f}x, overhead {med_far - med_local:.1f} ms")
    print(f"transport alone (card request): median {med_bare:.2f} ms; the act itself on the "
          f"server's inference thread: median {statistics.median(served) * 1e3:.1f} ms")
    print(f"4 clients at once: {calls_remote:.1f} calls/s -> calls/s ratio "
          f"{calls_remote / calls_local:.2f}x of in-process ({calls_local:.1f} calls/s just after)")

if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
