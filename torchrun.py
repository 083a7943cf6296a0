"""The ranks of a job launched by torchrun (torch.distributed; NCCL between GPUs, gloo on CPUs): extraction
(extract/run.py) and sweeps (heads/sweep/sweep.py) both run under it, so it sits beside them, in neither package.

    torchrun --nproc_per_node=4 pipeline.py extract --backbone t2t_vit_14 ... --out cache/c.zarr
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 pipeline.py extract ...
    torchrun --nproc_per_node=2 pipeline.py sweep --cache cache/c.zarr --lambdas 0.01:10 --out runs/a

The ranks exchange only Python objects (what is pending, errors; a sweep's trained heads and result rows), always
on a gloo group, so the same code runs on CPUs, on GPUs and on several machines. An extraction's ranks write
straight into the store on the shared file system; cache/store.py says how they share it (rank 0 holds the lock; a
journal of finished chunks that only rank 0 folds into the store). A sweep's rank 0 alone writes the run directory.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 may verify or convert a whole cache while the others wait (resume of a complete cache, HDF5 conversion),
# and the ranks of a sweep wait for the slowest one's share: far longer than gloo's default timeout. A rank that
# dies does not leave the others waiting this long: torchrun stops every rank of a job when one fails.
TIMEOUT = datetime.timedelta(hours=6)


class OtherRankFailed(RuntimeError):
    """Another rank failed and printed why; this one stops without repeating it (exit status 1)."""


def launched() -> bool:
    """True under torchrun (or any launcher that sets torch.distributed's environment variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int
    group: object = None   # the gloo group the objects travel on

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ["WORLD_SIZE"])
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))

    def device(self, name: str | None) -> str:
        """This rank's device for --device `name`: GPUs are shared out by local rank (cuda:LOCAL_RANK)."""
        if name is None:
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)") from None
        if device.type != "cuda":
            return name
        if device.index is not None and self.local_world > 1:
            raise ValueError(f"--device {name} names one GPU, but torchrun starts {self.local_world} ranks on this "
                             "machine: pass --device cuda (each rank then takes cuda:LOCAL_RANK)")
        return f"cuda:{device.index if device.index is not None else self.local_rank}"

    def start(self, device: str) -> "Ranks":
        """Joins the job: NCCL as the default group on GPUs (gloo on CPUs), and a gloo group for the objects."""
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        self.group = dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else dist.group.WORLD
        return self

    def broadcast(self, obj=None):
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (a barrier too)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


class OneProcess:
    """The one rank of a plain (not torchrun) run, with Ranks' methods, so that code written for ranks runs
    unchanged in one process."""
    rank, world = 0, 1

    def device(self, name: str | None) -> str | None:
        return name

    def start(self, device: str) -> "OneProcess":
        return self

    def broadcast(self, obj=None):
        return obj

    def gather(self, obj) -> list:
        return [obj]

    def close(self):
        pass


def ranks_of_this_job() -> "Ranks | OneProcess":
    """Ranks (not yet started) under torchrun, OneProcess otherwise."""
    return Ranks.from_env() if launched() else OneProcess()
