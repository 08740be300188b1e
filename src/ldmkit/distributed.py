"""Splitting generation work across processes launched by `torchrun` or `accelerate launch`.

accelerate's PartialState sets up torch.distributed (NCCL on GPUs, gloo on CPUs) from the
launcher's environment; a plain `ldm generate` is a world of one and needs no launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ldmkit.errors import LdmError


@dataclass
class Workers:
    rank: int
    world_size: int
    device: str  # this process's device when the user asked for "auto"
    _state: object = None

    def share(self, value):
        """Rank 0's value, on every rank (seeds and file indices must agree everywhere)."""
        if self.world_size == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.rank == 0 else None]
        broadcast_object_list(box)
        return box[0]

    def mine(self, items: list) -> list:
        """This rank's share of the items, round-robin so long and short prompts spread evenly."""
        return items[self.rank :: self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_workers(device: str) -> Workers:
    """The process group for this run; a world of one unless a launcher started several processes."""
    if launched_world_size() == 1:
        return Workers(rank=0, world_size=1, device=device)
    import torch
    from accelerate import PartialState

    # accelerate sets up a CPU (gloo) group only when told to: on a machine without CUDA, "auto"
    # would otherwise give a world of one in every process, each generating every prompt.
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    if state.num_processes != launched_world_size():
        raise LdmError(
            f"the launcher started {launched_world_size()} processes but accelerate joined "
            f"{state.num_processes}; pass --device cpu or cuda explicitly"
        )
    chosen = str(state.device) if device == "auto" else device
    if chosen.startswith("cuda") and ":" not in chosen:
        chosen = f"cuda:{state.local_process_index}"
    return Workers(rank=state.process_index, world_size=state.num_processes, device=chosen, _state=state)
