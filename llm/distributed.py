"""torch.distributed for ``llm.train``: the process group and the whole-batch collectives.

``torchrun --nproc-per-node N -m llm.train ...`` starts ``N`` processes (ranks). Each rank samples
and trains on its own ``prompts_per_step / N`` prompts with all ``G`` samples of each (whole groups
stay on one rank), and the gradient is summed across ranks by DDP. Everything that must see the
whole batch is made global here: the per-token statistics are all-gathered so that every rank
builds the method's plan (entropy, advantages, contributions, rejection sampling, Clip-Cov/KL-Cov
selections) from the same global batch with the same seed, and takes its own rows of it. So ``N``
processes make the decisions one process makes on the same global batch (docs/scaling.md).

A single process started without ``torchrun`` has world size 1, and every function here returns its
input unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistContext", "init_distributed", "local_tensor", "shard_model", "shutdown", "unsharded"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, checkpoints, figures and the progress bar."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def gather_rows(self, x: Tensor) -> Tensor:
        """All-gather ``[b, ...]`` tensors of equal shape on every rank into ``[world * b, ...]`` (rank order)."""
        if not self.enabled:
            return x
        is_bool = x.dtype == torch.bool
        y = (x.to(torch.uint8) if is_bool else x).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        out = torch.cat(parts)
        return out.to(torch.bool) if is_bool else out

    def gather_objects(self, obj: object) -> list[object]:
        """One picklable object from every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, *values: float, device: torch.device | None = None) -> list[float]:
        """Sums over ranks of some floats (float64, one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def max(self, value: float, device: torch.device | None = None) -> float:
        """Maximum over ranks of one float."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """True on every rank when ``flag`` is true on any rank (NaN skips, stop requests)."""
        return self.max(1.0 if flag else 0.0, device) > 0

    def sum_tensors_(self, tensors: list[Tensor]) -> None:
        """In-place sum over ranks of a list of tensors (the entropy gradient of ``--exact-first-order``)."""
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str, need_group: bool = False) -> DistContext:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    The backend is NCCL for CUDA and gloo for CPU. Without ``torchrun`` (or with ``WORLD_SIZE=1``) no
    group is created and the context has world size 1, unless ``need_group`` (FSDP needs one even for a
    single process under ``torchrun --nproc-per-node 1``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (need_group and "MASTER_ADDR" in os.environ):
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (end of run, or an error on every rank)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- FSDP2
def shard_model(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2 (``fully_shard``): each decoder layer, then the whole model. Returns the sharded modules.
    Parameters become ``DTensor`` shards (the optimizer must be built after them), and gradients are
    averaged over ranks, as DDP's are."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return [*layers, model]


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Full weights on every rank for the duration (sampling): each rank then runs its own number of
    forward passes (responses end at different lengths) with no collective inside them."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (FSDP parameter or gradient); a plain tensor unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t
