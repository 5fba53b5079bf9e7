"""torchrun entry point of the multi-process training tests: runs `rynn-pipe train ...`, then
each rank writes the sha256 of the full weights it holds to `<out>/rank-<r>.json`, so a test can
check that the ranks stayed in sync and that rank 0 saved what every rank holds.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_ranks.py \
        train --shards out/demo/shards --out /tmp/ddp --preset test --steps 3
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import trainer.train as training
from pipeline.cli import app
from pipeline.group import Group
from pipeline.io import write_json


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the weights by sorted name (float32 bytes): equal weights, equal digest."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> None:
    nets: list[torch.nn.Module] = []
    wrap = training.wrap

    def keep(*args, **kwargs) -> torch.nn.Module:       # the network train() builds
        nets.append(wrap(*args, **kwargs))
        return nets[-1]

    training.wrap = keep
    app(args=argv, prog_name="rynn-pipe", standalone_mode=False)
    out = Path(argv[argv.index("--out") + 1])
    weights = get_model_state_dict(nets[-1], options=StateDictOptions(full_state_dict=True))
    rank = Group.from_env().rank
    write_json(out / f"rank-{rank}.json", {"rank": rank, "sha256": weights_sha256(weights)})


if __name__ == "__main__":
    main(sys.argv[1:])
