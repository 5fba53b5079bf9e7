"""The processes a run is split over: one, or a torchrun-style group. The one place that reads
the launcher's environment and joins torch.distributed, for the pipeline and for training.

`torchrun --nproc_per_node 8 -m pipeline.cli tokenize ...` (or any launcher that sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) starts one process per rank. Stages
marked `distributed` (pretokenize) split their work by episode over the ranks, each writing its
own files into the stage's partial directory; rank 0 checks completeness, writes the stage's
documents and publishes. Every other stage runs once (whichever rank gets the key's lock; the
others find a cache hit). Training (trainer/train.py) runs one data-parallel rank per process.

    group = Group.from_env()          # Group(rank=0, world=1, local_rank=0) without torchrun
    group.leader                      # rank 0: the rank that reports and writes
    group.join()                      # the pipeline: gloo, CPU collectives
    group.barrier(); totals = group.all_sum([encodes, seconds])
    device = group.device(); group.join(device)   # training: cuda:LOCAL_RANK on nccl, else gloo

The process group is joined once per process (a second `join` is a no-op), with a long timeout
for the pipeline: ranks wait for each other at the end of a stage that may run for hours.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import StageError

if TYPE_CHECKING:
    import torch  # torch loads only where it is needed: the CLI starts without it

# torch is imported only inside the methods that need it: pipeline core stays torch-free, so
# the CLI starts fast and single-process stages never load it.

# How long a pipeline rank waits at a collective for the slowest rank (RYNN_DIST_TIMEOUT_S
# overrides it, and torch's default for training).
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Group":
        """This process's place in a torchrun-style launch (read and checked; joins nothing),
        or a group of one when `WORLD_SIZE` is unset or 1."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise StageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from exc
        if world <= 1:
            return cls()
        if not 0 <= rank < world:
            raise StageError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank=rank, world=world, local_rank=local)

    def device(self) -> "torch.device":
        """This rank's device: cuda:LOCAL_RANK (made the current device) where CUDA is
        available, else the CPU."""
        import torch  # torch loads only where it is needed: the CLI starts without it
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device(f"cuda:{self.local_rank}")
        torch.cuda.set_device(device)
        return device

    def join(self, device: "torch.device | None" = None, *,
             timeout_s: float | None = DEFAULT_TIMEOUT_S) -> "Group":
        """Join the process group once (nothing for a group of one): nccl when the collectives
        run on a CUDA `device`, else gloo. `timeout_s` None: torch's default."""
        if self.world == 1:
            return self
        # torch loads only where it is needed: the CLI starts without it
        import torch.distributed as dist
        if dist.is_initialized():
            return self
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise StageError(f"WORLD_SIZE={self.world} but {', '.join(missing)} not set; launch "
                             "with torchrun (or set them) so the ranks can meet")
        override = os.environ.get("RYNN_DIST_TIMEOUT_S")
        timeout = float(override) if override else timeout_s
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=None
                                if timeout is None else datetime.timedelta(seconds=timeout))
        return self

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            # torch loads only where it is needed: the CLI starts without it
            import torch.distributed as dist
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the CPU: the pipeline's gloo group)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch  # torch loads only where it is needed: the CLI starts without it
        # torch loads only where it is needed: the CLI starts without it
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def leader_says(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if self.world == 1:
            return flag
        # torch loads only where it is needed: the CLI starts without it
        import torch.distributed as dist
        box = [flag if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
