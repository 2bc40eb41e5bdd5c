"""1 process vs 2 gloo processes at the same global batch: every term's value and the DDP-averaged gradients of the
student parameters and of the loss-side parameters match, for global loss (with and without gather_with_grad) and
local loss; loss-side parameters stay identical across ranks (and equal to 1 process) over optimizer steps."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from training import distributed
from training.distill import FeatPair, build_distill_loss

SPEC = ("task=1,crd=1,fd=3,icl=1,xkd=1,mfd=2,gd=1,afd=1,sim=1,sim_inter=1,sim_intra=1,emb=1,emb_text=1,"
        "feat=1")
G, D_IN, D_S, D_T, N_TOK, W_S, W_T = 8, 5, 4, 6, 4, 3, 7
MODES = [(False, True), (False, False), (True, True)]  # (local_loss, gather_with_grad)
STEPS = 3


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(123)
        self.w_v = nn.Parameter(torch.randn(D_IN, D_S, generator=gen, dtype=torch.float64))
        self.w_t = nn.Parameter(torch.randn(D_IN, D_S, generator=gen, dtype=torch.float64))
        self.w_f = nn.Parameter(torch.randn(D_IN, W_S, generator=gen, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return {"s_v": x["x_v"] @ self.w_v, "s_t": x["x_t"] @ self.w_t, "s_vm": x["x_m"] @ self.w_v,
                "tok": x["tok"] @ self.w_f, "ls": self.logit_scale.exp()}


def problem():
    gen = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    nrm = torch.nn.functional.normalize
    return {"x_v": r(G, D_IN), "x_t": r(G, D_IN), "x_m": r(G, D_IN), "tok": r(G, N_TOK, D_IN),
            "t_v": nrm(r(G, D_T), dim=-1), "t_t": nrm(r(G, D_T), dim=-1), "t_tok": r(G, 16, W_T)}


def run(rank: int, world: int, local_loss: bool, gather_with_grad: bool) -> dict:
    """Per-term values and DDP-averaged gradients, then STEPS optimizer steps; everything at world size `world`."""
    data = problem()
    b = G // world
    part = {k: v[rank * b:(rank + 1) * b] for k, v in data.items()}
    student = Student()
    loss = build_distill_loss(SPEC, D_S, D_T, local_loss=local_loss, gather_with_grad=gather_with_grad,
                              feat_layers=[FeatPair("image", 0, 3, W_S, W_T)], seed=100 + rank).double()
    loss.sync_()  # rank 0's seed wins
    params = list(student.parameters()) + list(loss.parameters())

    def forward():
        f = student(part)
        return loss(student_image=f["s_v"], student_text=f["s_t"], student_scale=f["ls"],
                    teacher_image=part["t_v"], teacher_text=part["t_t"], teacher_scale=torch.tensor(30.0),
                    student_image_masked=f["s_vm"], student_intermediates={"image": [f["tok"]]},
                    teacher_intermediates={"image": [part["t_tok"]]})

    out = forward()
    result = {"values": {}, "grads": {}}
    for name, value in out.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        distributed.all_reduce_mean_(grads)  # DDP for the student, loss_fn.average_gradients_ for the loss side
        values = [torch.zeros_like(value.detach()) for _ in range(world)]
        if world > 1:
            dist.all_gather(values, value.detach().contiguous())
        else:
            values = [value.detach()]
        result["values"][name] = torch.stack(values)
        result["grads"][name] = grads
    opt = torch.optim.AdamW(student.parameters(), lr=0.05)
    opt_loss = torch.optim.AdamW(loss.param_groups(0.1), lr=0.05)
    for _ in range(STEPS):
        opt.zero_grad()
        opt_loss.zero_grad()
        forward()["total"].backward()
        distributed.all_reduce_mean_([p.grad for p in student.parameters()])
        loss.average_gradients_()
        opt.step()
        opt_loss.step()
    result["loss_state"] = {k: v.clone() for k, v in loss.state_dict().items()}
    return result


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save({mode: run(rank, world, *mode) for mode in MODES}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res")
        mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
        return [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("mode", MODES, ids=["global", "global-nogradgather", "local"])
def test_two_processes_match_one_process(two_process_results, mode):
    local_loss, _ = mode
    ref = run(0, 1, *mode)
    r0, r1 = (res[mode] for res in two_process_results)
    assert set(r0["values"]) == set(ref["values"]) == set(SPEC_TERMS) | {"total"}
    for name, ref_value in ref["values"].items():
        values = r0["values"][name]
        if local_loss:  # each rank holds its local part; their mean is the global loss
            torch.testing.assert_close(values.mean(), ref_value[0], rtol=1e-10, atol=1e-12, msg=name)
        else:  # every rank reports the global loss
            torch.testing.assert_close(values, ref_value.expand(2), rtol=1e-10, atol=1e-12, msg=name)
        for i, (g0, g1, g_ref) in enumerate(zip(r0["grads"][name], r1["grads"][name], ref["grads"][name])):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0, msg=f"{name}: param {i} differs across ranks")
            torch.testing.assert_close(g0, g_ref, rtol=1e-8, atol=1e-11, msg=f"{name}: param {i}")
    for key, value in ref["loss_state"].items():
        torch.testing.assert_close(r0["loss_state"][key], r1["loss_state"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(r0["loss_state"][key], value, rtol=1e-7, atol=1e-9, msg=key)


SPEC_TERMS = [item.split("=")[0] for item in SPEC.split(",")]
