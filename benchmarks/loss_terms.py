"""Benchmarks of the distillation loss zoo (docs/losses_impl.md quotes its output).

(a) `gd` peak extra memory (forward + backward) at G=1024, d=512: the matrix-product implementation in
    training.distill.terms vs the naive one that materialises the G×d×G tensor of per-pair key gradients (CLIP-KD's
    public code). Each measurement runs in a fresh subprocess and reports the growth of the peak resident set
    (ru_maxrss) over a baseline taken after the inputs exist (on CUDA: torch.cuda.max_memory_allocated). The naive
    version is measured at smaller G (its G×d×G tensor is 2 GiB at G=1024) and its size at G=1024 is given.
(c) sigmoid terms (task_siglip) peak extra memory (forward + backward), same method as (a): the chunked
    implementation of training.distill.terms (--chunk rows at a time, the backward recomputes each chunk's logits)
    vs the dense one that lets autograd keep the G×G logits and their intermediates.
(b) zero-weighted terms: forward+backward time of "task=1,crd=1,icl=1,fd=2000" with and without heavy terms
    scheduled to weight 0 at the measured step (gd, afd, xkd, sim, mfd, emb, emb_text, all "@from:10**9"), and with
    those terms on, in one run (interleaved, median of --reps).

    python benchmarks/loss_terms.py [--G 1024] [--d 512] [--reps 7] [--device cpu|cuda] [--chunk 256]
                                    [--part all|memory|time|sigmoid]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BASE = "task=1,crd=1,icl=1,fd=2000"
HEAVY = ("gd", "afd", "xkd", "sim", "mfd", "emb", "emb_text")


def gd_naive(p_v, p_t, s_scale, t_v, t_t, t_scale):
    """gd with the key gradients built from a G×d×G tensor (what the matrix product avoids)."""
    def grads(a, k, scale):
        g = a.shape[0]
        diff = F.softmax(scale * a @ k.t(), dim=-1) - torch.eye(g, device=a.device)
        g_a = scale * (diff.unsqueeze(-1) * k.unsqueeze(0)).sum(1) / g  # [G, G, d] -> [G, d]
        g_k = scale * (diff.unsqueeze(-1) * a.unsqueeze(1)).sum(0) / g
        return g_a, g_k

    total = 0.0
    for (sa, sk), (ta, tk) in (((p_v, p_t), (t_v, t_t)), ((p_t, p_v), (t_t, t_v))):
        gs_a, gs_k = grads(sa, sk, s_scale)
        with torch.no_grad():
            gt_a, gt_k = grads(ta, tk, t_scale)
        total = total + F.mse_loss(gs_a, gt_a) + F.mse_loss(gs_k, gt_k)
    return total


def task_ref(p_v, p_t, s_scale, t_v, t_t, t_scale):
    """One symmetric InfoNCE (the `task` term) with the same signature: the G×G cost every contrastive term pays."""
    from training.distill import terms

    return terms.task(p_v, p_t, p_v, p_t, s_scale, torch.arange(p_v.shape[0], device=p_v.device))


def sigmoid_dense(p_v, p_t, s_scale, t_v, t_t, t_scale):
    """task_siglip written the direct way: the G×G logits (and autograd's saved intermediates) all at once."""
    x = s_scale * p_v @ p_t.t() - 10.0
    y = torch.eye(x.shape[0], device=x.device)
    return (F.softplus(x) - y * x).sum() / x.shape[0]


def sigmoid_chunked(chunk: int):
    def fn(p_v, p_t, s_scale, t_v, t_t, t_scale):
        from training.distill import terms

        return terms.task_siglip(p_v, p_t, s_scale, -10.0, torch.arange(p_v.shape[0], device=p_v.device), chunk)
    return fn


def _inputs(g, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = [F.normalize(torch.randn(g, d, generator=gen), dim=-1).to(device) for _ in range(4)]
    return x[0].requires_grad_(), x[1].requires_grad_(), x[2], x[3]


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_memory(impl: str, g: int, d: int, device: str) -> int:
    """Child mode: peak extra bytes of one forward+backward of impl ('matmul'/'naive' gd, 'task', 'sigmoid_dense',
    'sigmoid_chunk:C')."""
    from training.distill import terms

    torch.set_num_threads(1)
    if impl.startswith("sigmoid_chunk:"):
        fn = sigmoid_chunked(int(impl.split(":")[1]))
    else:
        fn = {"matmul": terms.gd, "naive": gd_naive, "task": task_ref, "sigmoid_dense": sigmoid_dense}[impl]
    warm = _inputs(8, d, device, seed=1)  # load kernels / allocator pools before the baseline
    fn(warm[0], warm[1], 10.0, warm[2], warm[3], 50.0).backward()
    p_v, p_t, t_v, t_t = _inputs(g, d, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _maxrss_bytes()
    fn(p_v, p_t, 10.0, t_v, t_t, 50.0).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _maxrss_bytes() - base


def memory_in_subprocess(impl: str, g: int, d: int, device: str) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem", impl, str(g), str(d), "--device", device]
    # a fixed mmap threshold turns off glibc's adaptive one, so every large tensor is its own mapping, returned to
    # the OS when freed: the peak RSS then tracks the peak of live tensors (without it the number drifts by 2x)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def bench_memory(g: int, d: int, device: str) -> list[str]:
    rows = ["| implementation | G | d | peak extra memory (fwd+bwd, measured) | G×d×G float32 tensor |",
            "|---|---|---|---|---|"]
    for impl, key, sizes in (("`gd`, matrix products (ours)", "matmul", (g // 4, g)),
                             ("`task` (one InfoNCE, for scale)", "task", (g,)),
                             ("`gd`, naive G×d×G", "naive", (g // 8, g // 4))):
        for n in sizes:
            size = "—" if key == "task" else mib(4.0 * n * d * n)
            rows.append(f"| {impl} | {n} | {d} | {mib(memory_in_subprocess(key, n, d, device))} | {size} |")
    rows.append(f"| `gd`, naive G×d×G (not run: its G×d×G tensor alone) | {g} | {d} | ≥ {mib(4.0 * g * d * g)} | "
                f"{mib(4.0 * g * d * g)} |")
    return rows


def bench_sigmoid_memory(d: int, chunk: int, device: str, sizes=(1024, 2048, 4096, 8192)) -> list[str]:
    rows = [f"| G | d | chunked (ours, chunk = {chunk} rows) | dense (G×G logits kept by autograd) | dense / chunked "
            "| one G×G float32 matrix |", "|---|---|---|---|---|---|"]
    for g in sizes:
        chunked = memory_in_subprocess(f"sigmoid_chunk:{chunk}", g, d, device)
        dense = memory_in_subprocess("sigmoid_dense", g, d, device)
        rows.append(f"| {g} | {d} | {mib(chunked)} | {mib(dense)} | {dense / max(chunked, 1):.1f} | "
                    f"{mib(4.0 * g * g)} |")
    return rows


def bench_time(g: int, d: int, reps: int, device: str) -> list[str]:
    from training.distill import build_distill_loss

    torch.set_num_threads(1)
    d_s = d * 3 // 4  # a projection is active (d_s != d_t)
    off = ",".join(f"{t}=1@from:1000000000" for t in HEAVY)
    on = ",".join(f"{t}=1" for t in HEAVY)
    specs = {"base": BASE, "base + heavy terms at weight 0": f"{BASE},{off}", "base + heavy terms on": f"{BASE},{on}"}
    losses = {k: build_distill_loss(s, d_s, d).to(device) for k, s in specs.items()}
    gen = torch.Generator().manual_seed(0)
    s_v, s_t = torch.randn(g, d_s, generator=gen).to(device), torch.randn(g, d_s, generator=gen).to(device)
    t_v = F.normalize(torch.randn(g, d, generator=gen), dim=-1).to(device)
    t_t = F.normalize(torch.randn(g, d, generator=gen), dim=-1).to(device)

    def step(loss):
        a, b = s_v.clone().requires_grad_(), s_t.clone().requires_grad_()
        out = loss(student_image=a, student_text=b, student_scale=torch.tensor(20.0, device=device),
                   teacher_image=t_v, teacher_text=t_t, teacher_scale=torch.tensor(100.0, device=device), step=0)
        out["total"].backward()
        if device == "cuda":
            torch.cuda.synchronize()

    ops = {}
    for k in specs:
        step(losses[k])  # warm-up
        with _OpCounter() as counter:
            step(losses[k])
        ops[k] = counter.count
    times = {k: [] for k in specs}
    order = random.Random(0)
    for _ in range(reps):
        keys = list(specs)
        order.shuffle(keys)  # interleaved in random order, so drift and cache effects hit all variants alike
        for k in keys:
            t0 = time.perf_counter()
            step(losses[k])
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}  # other processes only ever add time: best-of-N is the robust one
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [f"| spec (G={g}, d_s={d_s}, d_t={d}, {device}) | aten ops fwd+bwd | best of {reps} | ratio to base "
            f"| median | ratio to base |", "|---|---|---|---|---|---|"]
    for k in specs:
        rows.append(f"| {k} | {ops[k]} | {best[k] * 1e3:,.1f} ms | {best[k] / best['base']:.3f} "
                    f"| {med[k] * 1e3:,.1f} ms | {med[k] / med['base']:.3f} |")
    return rows


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (forward and backward): a deterministic measure of the work done."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--G", type=int, default=1024)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=256, help="rows per chunk of the sigmoid terms in (c)")
    ap.add_argument("--part", choices=["all", "memory", "time", "sigmoid"], default="all")
    ap.add_argument("--_mem", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mem:
        impl, g, d = args._mem
        print(json.dumps({"bytes": measure_memory(impl, int(g), int(d), args.device)}))
        return
    print(f"torch {torch.__version__}, device {args.device}, threads 1")
    if args.part in ("all", "memory"):
        print("\n(a) gd peak extra memory\n")
        print("\n".join(bench_memory(args.G, args.d, args.device)))
    if args.part in ("all", "sigmoid"):
        print("\n(c) task_siglip peak extra memory, chunked vs dense\n")
        print("\n".join(bench_sigmoid_memory(args.d, args.chunk, args.device)))
    if args.part in ("all", "time"):
        print("\n(b) zero-weighted terms are not computed\n")
        print("\n".join(bench_time(args.G, args.d, args.reps, args.device)))


if __name__ == "__main__":
    main()
