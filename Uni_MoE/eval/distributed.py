"""Expert-parallel evaluation (the original's ``--enable_deepspeed_moe True --eval_ep_size N``).

Every rank loads the model with DeepSpeed-MoE experts sharded over ``ep_size`` ranks and runs the SAME
batches: each MoE forward exchanges tokens between all ranks of an expert-parallel group, so all of
them must step together; identical inputs (and seeds) keep their generations identical, and
``synced_gpus`` keeps stepping until every rank is done. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started torch.distributed, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """This rank's GPU, or the CPU where there is none."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """An unused local TCP port (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_expert_parallel(ep_size: int) -> RankInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) and check ``ep_size``.

    Started without a launcher (no ``RANK`` in the environment) it becomes a one-process world.
    """
    from ..model.moe.deepspeed_backend import init_deepspeed_comm

    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        init_deepspeed_comm(dist_backend=None if torch.cuda.is_available() else "gloo")
    info = RankInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", 0)), owns_group)
    if ep_size < 1 or info.world_size % ep_size:
        raise ValueError(f"--eval_ep_size {ep_size} must divide the number of processes ({info.world_size})")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def end_expert_parallel(info: RankInfo) -> None:
    """After a finished run, all ranks meet once more and the process group that ``init_expert_parallel``
    started is destroyed, so no rank exits while another still writes or talks to it."""
    if not info.owns_group or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
