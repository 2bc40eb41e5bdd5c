"""The canonical optimizer state, whatever the engine, and the engines that own the student's optimizer.

Canonical format: what `torch.optim.AdamW(param_groups(student, loss_fn)).state_dict()` holds in a plain
single-process run (state keyed by the index of the parameter in those groups, full tensors). So a checkpoint written
under FSDP2 or DeepSpeed resumes under plain DDP and the other way round.
"""

from __future__ import annotations

import torch
from torch import nn

from .ddp import Engine, MakeOptimizer


def named_params_of(*modules: tuple[str, nn.Module]) -> dict[int, str]:
    """{id(parameter): prefixed name} over (prefix, module) pairs."""
    return {id(p): f"{prefix}{name}" for prefix, module in modules for name, p in module.named_parameters()}


def hparams(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def split_groups(groups: list[dict], side: set[int]) -> tuple[list[dict], list[dict], list[int], list[int]]:
    """Canonical groups -> (student groups, side groups, canonical index of each student / side group)."""
    main, other, main_idx, other_idx = [], [], [], []
    for j, g in enumerate(groups):
        mine = [p for p in g["params"] if id(p) not in side]
        theirs = [p for p in g["params"] if id(p) in side]
        if mine:
            main.append({**hparams(g), "params": mine})
            main_idx.append(j)
        if theirs:
            other.append({**hparams(g), "params": theirs})
            other_idx.append(j)
    return main, other, main_idx, other_idx


def optimizer_format(opt: torch.optim.Optimizer, states: dict[int, dict], canon_groups: list[dict] | None,
                     group_index: list[int]) -> dict:
    """{param id: state} -> `opt`'s own state_dict format (hyper-parameters from the canonical groups if given)."""
    out_state, out_groups, i = {}, [], 0
    for j, g in enumerate(opt.param_groups):
        hp = hparams(g)
        if canon_groups is not None:
            hp.update(hparams(canon_groups[group_index[j]]))
        ids = []
        for p in g["params"]:
            if id(p) in states:
                out_state[i] = states[id(p)]
            ids.append(i)
            i += 1
        out_groups.append({**hp, "params": ids})
    return {"state": out_state, "param_groups": out_groups}


class Optimizers:
    """The student's optimizer and the loss-side one (DeepSpeed, Horovod) seen as one by the schedule and the logs."""

    def __init__(self, *parts: torch.optim.Optimizer | None):
        self.parts = [p for p in parts if p is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


class SideOptimizerEngine(Engine):
    """Engines that own the student's optimizer (DeepSpeed, Horovod): the loss-side heads get their own plain
    optimizer with the same hyper-parameters, and the two are merged into the canonical checkpoint format."""

    def _make_optimizer(self, make_optimizer: MakeOptimizer):
        side = {id(p) for p in self.loss_fn.parameters()}
        self.canon_groups_for_load = None
        student_groups, side_groups, self.student_index, self.side_index = split_groups(self.groups, side)
        self.side_optimizer = make_optimizer(side_groups) if side_groups else None
        self.student_optimizer = self._student_optimizer(make_optimizer(student_groups))
        return Optimizers(self.student_optimizer, self.side_optimizer)

    def _student_optimizer(self, optimizer):
        return optimizer

    # per-parameter full states of the student optimizer (engine-specific)
    def _student_states(self) -> dict[int, dict]:
        return {id(p): dict(s) for p, s in self.student_optimizer.state.items()}

    def _load_student_states(self, states: dict[int, dict]) -> None:
        self.student_optimizer.load_state_dict(
            optimizer_format(self.student_optimizer, states, self.canon_groups_for_load, self.student_index))

    def optimizer_state_dict(self) -> dict:
        states = self._student_states()
        if self.side_optimizer is not None:
            states.update({id(p): dict(s) for p, s in self.side_optimizer.state.items()})
        index = {id(p): i for i, p in enumerate(self.params)}
        groups, i = [], 0
        for j, g in enumerate(self.groups):
            source = (self.student_optimizer.param_groups[self.student_index.index(j)] if j in self.student_index
                      else self.side_optimizer.param_groups[self.side_index.index(j)])
            groups.append({**hparams(source), "params": list(range(i, i + len(g["params"])))})
            i += len(g["params"])
        return {"state": {index[pid]: s for pid, s in states.items() if pid in index}, "param_groups": groups}

    def load_optimizer_state_dict(self, state: dict) -> None:
        by_id = {id(self.params[i]): s for i, s in state["state"].items()}
        self.canon_groups_for_load = state["param_groups"]
        self._load_student_states({k: v for k, v in by_id.items() if k in self._student_ids()})
        if self.side_optimizer is not None:
            self.side_optimizer.load_state_dict(
                optimizer_format(self.side_optimizer, by_id, state["param_groups"], self.side_index))

    def _student_ids(self) -> set[int]:
        return {id(p) for p in self.student.parameters()}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.student_optimizer.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()
