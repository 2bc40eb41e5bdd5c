"""A stand-in for `horovod.torch` on top of torch.distributed, for training/parallel/horovod.py (--horovod).

Horovod cannot be built in the test environment (docs/scale_out.md). This implements the part of its API the engine
uses, with Horovod's semantics: DistributedOptimizer averages every gradient over the ranks before step() (after
`backward_passes_per_step` backward passes), `synchronize()` does it early (for clipping) and `skip_synchronize()`
makes the following step() skip it.
"""

from __future__ import annotations

import contextlib
import os

import torch.distributed as dist

Average = "average"


def init() -> None:
    pass


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast_parameters(params, root_rank: int = 0) -> None:
    tensors = params.values() if isinstance(params, dict) else [p for _, p in params]
    if _world() > 1:
        for t in tensors:
            dist.broadcast(t.data, root_rank)


class DistributedOptimizer:
    def __init__(self, optimizer, named_parameters=None, backward_passes_per_step: int = 1, op=Average):
        names = {id(p) for _, p in (named_parameters or [])}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if named_parameters is not None and any(id(p) not in names for p in params):
            raise ValueError("named_parameters was specified, but one or more model parameters were not named")
        self._optimizer, self._skip = optimizer, False
        self.backward_passes_per_step = backward_passes_per_step

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    @property
    def state(self):
        return self._optimizer.state

    def synchronize(self) -> None:
        world = _world()
        if world > 1:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure=None):
        if not self._skip:
            self.synchronize()
        return self._optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self._optimizer.load_state_dict(state)
