"""The processes a pipeline run is split over: one, or a torchrun-style group.

`torchrun --nproc_per_node 8 -m pipeline.cli tokenize ...` (or any launcher that sets `RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) starts one process per rank. Stages marked
`distributed` (pretokenize) split their work by episode over the ranks, each writing its own
files into the stage's partial directory; rank 0 checks completeness, writes the stage's
documents and publishes. Every other stage runs once (whichever rank gets the key's lock; the
others find a cache hit). Collectives go through torch.distributed on the gloo backend, with a
long timeout: ranks wait for each other at the end of a stage that may run for hours.

    group = Group.from_env()          # Group(rank=0, world=1) without torchrun
    group.barrier(); totals = group.all_sum([encodes, seconds])
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from pipeline.errors import StageError

# How long a rank waits at a collective for the slowest rank (RYNN_DIST_TIMEOUT_S overrides).
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Group":
        """This process's rank in a torchrun-style launch (joining the gloo group), or a group of
        one when `WORLD_SIZE` is unset or 1."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as exc:
            raise StageError(f"RANK / WORLD_SIZE must be integers: {exc}") from exc
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise StageError(f"RANK={rank} is outside WORLD_SIZE={world}")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise StageError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                             "torchrun (or set them) so the ranks can meet")
        import torch.distributed as dist
        if not dist.is_initialized():
            timeout = float(os.environ.get("RYNN_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
        return cls(rank=rank, world=world)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def leader_says(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        box = [flag if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
