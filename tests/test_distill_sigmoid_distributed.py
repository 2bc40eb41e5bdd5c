"""The sigmoid terms, 1 process vs 2 gloo processes at the same global batch (the pattern of
test_distill_distributed.py): values and DDP-averaged gradients of the student (its own logit scale and bias for a
SigLIP student) and of the loss-side scale and bias match, in every loss mode, with chunks that cross rank
boundaries, over a teacher ensemble with its own per-member scales and biases."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from helpers import free_port
from training import distributed
from training.distill import build_distill_loss

SPEC = "task_siglip=1,sig_kd=1"
G, D_IN, D_S, D_T = 8, 5, 4, (6, 3)
MODES = [(False, True), (False, False), (True, True)]  # (local_loss, gather_with_grad)
STUDENTS = ["clip", "siglip"]  # loss-side scale/bias, or the student's own
CHUNK = 3  # does not divide the per-rank batch: chunks straddle the rows of both ranks


class Student(nn.Module):
    def __init__(self, siglip: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(123)
        self.w_v = nn.Parameter(torch.randn(D_IN, D_S, generator=gen, dtype=torch.float64))
        self.w_t = nn.Parameter(torch.randn(D_IN, D_S, generator=gen, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if siglip else None

    def forward(self, x):
        return x["x_v"] @ self.w_v, x["x_t"] @ self.w_t, self.logit_scale.exp(), self.logit_bias


def problem():
    gen = torch.Generator().manual_seed(7)
    nrm = torch.nn.functional.normalize
    out = {"x_v": torch.randn(G, D_IN, generator=gen, dtype=torch.float64),
           "x_t": torch.randn(G, D_IN, generator=gen, dtype=torch.float64)}
    for m, d in enumerate(D_T):
        out[f"t_v{m}"] = nrm(torch.randn(G, d, generator=gen, dtype=torch.float64), dim=-1)
        out[f"t_t{m}"] = nrm(torch.randn(G, d, generator=gen, dtype=torch.float64), dim=-1)
    return out


def run(rank: int, world: int, student_kind: str, local_loss: bool, gather_with_grad: bool) -> dict:
    data = problem()
    b = G // world
    part = {k: v[rank * b:(rank + 1) * b] for k, v in data.items()}
    student = Student(student_kind == "siglip")
    loss = build_distill_loss(SPEC, D_S, list(D_T), local_loss=local_loss, gather_with_grad=gather_with_grad,
                              sigmoid_chunk=CHUNK, student_logit_bias=student_kind == "siglip",
                              teacher_logit_biases=[-3.0, -5.0]).double()
    loss.sync_()
    params = list(student.parameters()) + list(loss.parameters())
    s_v, s_t, ls, bias = student(part)
    out = loss(student_image=s_v, student_text=s_t, student_scale=ls, student_bias=bias,
               teacher_image=[part["t_v0"], part["t_v1"]], teacher_text=[part["t_t0"], part["t_t1"]],
               teacher_scale=[torch.tensor(8.0), torch.tensor(15.0)])
    result = {"values": {}, "grads": {}}
    for name, value in out.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        distributed.all_reduce_mean_(grads)
        values = [torch.zeros_like(value.detach()) for _ in range(world)]
        if world > 1:
            dist.all_gather(values, value.detach().contiguous())
        else:
            values = [value.detach()]
        result["values"][name] = torch.stack(values)
        result["grads"][name] = grads
    return result


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save({(s, *mode): run(rank, world, s, *mode) for s in STUDENTS for mode in MODES}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res")
        mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
        return [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("student_kind", STUDENTS)
@pytest.mark.parametrize("mode", MODES, ids=["global", "global-nogradgather", "local"])
def test_two_processes_match_one_process(two_process_results, student_kind, mode):
    local_loss, _ = mode
    key = (student_kind, *mode)
    ref = run(0, 1, *key)
    r0, r1 = (res[key] for res in two_process_results)
    assert set(ref["values"]) == {"task_siglip", "sig_kd", "total"}
    for name, ref_value in ref["values"].items():
        values = r0["values"][name]
        if local_loss:  # each rank holds its local part; their mean is the global loss
            torch.testing.assert_close(values.mean(), ref_value[0], rtol=1e-10, atol=1e-12, msg=name)
        else:
            torch.testing.assert_close(values, ref_value.expand(2), rtol=1e-10, atol=1e-12, msg=name)
        for i, (g0, g1, g_ref) in enumerate(zip(r0["grads"][name], r1["grads"][name], ref["grads"][name])):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0, msg=f"{name}: param {i} differs across ranks")
            torch.testing.assert_close(g0, g_ref, rtol=1e-8, atol=1e-11, msg=f"{name}: param {i}")
        assert any(g.abs().sum() > 0 for g in ref["grads"][name][-2:]), "the scale/bias get a gradient"
