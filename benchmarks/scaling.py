"""Scale-out benchmark: throughput of 1 vs 2 processes, and training-state memory per rank of DDP, FSDP2 and ZeRO.

    python benchmarks/scaling.py                                   # both parts, CPU/gloo defaults (a few minutes)
    python benchmarks/scaling.py --part throughput --steps 20 --batch-size 32
    python benchmarks/scaling.py --part memory --memory-model ViT-B-16 --memory-image-size 64

Throughput: the real training step (training.trainer.Trainer + its train_step) on synthetic data, tiny-student
distilled from tiny-teacher with the clip-kd recipe, one thread per process, the same per-process batch (weak
scaling) and the same global batch (strong scaling); samples/s over the timed steps after a warm-up.

Memory: a student big enough for sharding to matter (ViT-B-16 by default, at a small image size so CPU steps stay
short; the parameter count barely changes), the task loss only, 2 processes. Measured on each rank just before the
optimizer update of the second step, when parameters, gradients and the Adam moments all exist:
  state MiB  = bytes of every live tensor storage in the process (parameters, gradients, optimizer state, DDP's
               gradient buckets, DeepSpeed's flat buffers; deduplicated by storage, DTensor shards counted locally)
  RSS        = the process's resident memory at that point, and its peak (PyTorch and DeepSpeed themselves, the
               full model each rank builds before sharding it, gathered working copies, allocator caches)
and compared with the textbook bytes per rank for fp32 weights and Adam, Psi parameters, N ranks (ZeRO paper's
accounting; DeepSpeed keeps a full fp32 working copy of the weights in stages 1-2 besides its fp32 master partition):
  DDP 16 Psi (4 weights + 4 gradients, as views of the all-reduce buckets + 8 Adam),
  ZeRO-1 and ZeRO-2 4 + 16/N (ZeRO-1 holds full gradients, 4 more, only until its reduction at the end of the
  backward), ZeRO-3 20/N (working + master + gradient + Adam partitions), FSDP2 16/N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
import types

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable_tensor_bytes(*roots) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` (the engine: its model, optimizers, DeepSpeed's
    flat buffers and partitions), parameter gradients included, DTensors by their local shard."""
    from torch.distributed.tensor import DTensor

    skip = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
            types.MethodType, types.BuiltinFunctionType, torch.device, torch.dtype)
    storages: dict[int, int] = {}
    seen: set[int] = set()
    alive: list = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        alive.append(obj)  # temporaries (to_local() views) must outlive the walk, or their ids get reused
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, DTensor):
                stack.append(obj.to_local())
            elif obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(getattr(obj, "__dict__", {}).values())  # e.g. DeepSpeed's ds_tensor partitions
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def current_rss() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _worker(rank: int, world_size: int, port: int, job: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from training import distributed
    from training.params import parse_config
    from training.train import train_step
    from training.trainer import Trainer

    env = distributed.init_distributed("cpu")
    trainer = Trainer(parse_config(job["argv"]), env)
    trainer.model.train()
    trainer.data.set_epoch(0)
    batches = iter(trainer.data.dataloader)
    result: dict = {}
    if job["kind"] == "memory":
        real_step = trainer.engine.step

        def step() -> None:
            if trainer.step == 1:  # second step: parameters, gradients and Adam moments all alive
                result["state_bytes"] = reachable_tensor_bytes(trainer.engine)
                result["rss"] = current_rss()
            real_step()

        trainer.engine.step = step
        for _ in range(2):
            trainer.schedule(trainer.step)
            train_step(trainer, next(batches))
            trainer.step += 1
    else:
        timed = []
        for i in range(job["warmup"] + job["steps"]):
            batch = next(batches)
            distributed.barrier()
            start = time.perf_counter()
            trainer.schedule(trainer.step)
            train_step(trainer, batch)
            trainer.step += 1
            distributed.barrier()
            if i >= job["warmup"]:
                timed.append(time.perf_counter() - start)
        result["step_s"] = sum(timed) / len(timed)
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered: list = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    distributed.cleanup()


def spawn(job: dict, nprocs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(nprocs, free_port(), job, out), nprocs=nprocs, join=True)
        with open(out) as f:
            return json.load(f)


# ---- the two parts --------------------------------------------------------------------------------------------

def throughput(opts) -> list[str]:
    def argv(batch: int, *extra: str) -> list[str]:
        return ["--model", opts.student, "--teacher", opts.teacher, "--recipe", "clip-kd", "--dataset-type",
                "synthetic", "--synthetic-num-samples", str(opts.batch_size * 2 * (opts.warmup + opts.steps + 1)),
                "--batch-size", str(batch), "--workers", "0", "--logs", "", "--precision", "fp32", "--device",
                "cpu", "--warmup", "1", "--gather-with-grad", *extra]

    rows = ["| processes | engine | batch / process | global batch | step (s) | samples/s | speed-up |",
            "|---|---|---|---|---|---|---|"]
    base = None
    configs = [(1, "ddp", opts.batch_size, []), (2, "ddp", opts.batch_size, []),
               (2, "ddp", opts.batch_size // 2, []), (2, "fsdp", opts.batch_size, ["--fsdp"]),
               (2, "zero2", opts.batch_size, ["--deepspeed", opts.zero_config(2)])]
    for nprocs, engine, batch, extra in configs:
        res = spawn({"kind": "throughput", "argv": argv(batch, *extra), "warmup": opts.warmup, "steps": opts.steps},
                    nprocs)
        step = max(r["step_s"] for r in res)
        rate = batch * nprocs / step
        base = base or rate
        rows.append(f"| {nprocs} | {engine} | {batch} | {batch * nprocs} | {step:.3f} | {rate:.1f} | "
                    f"{rate / base:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def memory(opts) -> list[str]:
    import open_clip

    import training  # noqa: F401

    psi = sum(p.numel() for p in open_clip.create_model(opts.memory_model, force_image_size=opts.memory_image_size)
              .parameters())
    argv = ["--model", opts.memory_model, "--force-image-size", str(opts.memory_image_size), "--distill", "task=1",
            "--dataset-type", "synthetic", "--synthetic-num-samples", "16", "--batch-size", str(opts.memory_batch),
            "--workers", "0", "--logs", "", "--precision", "fp32", "--device", "cpu", "--warmup", "1"]
    n = 2
    small = {"reduce_bucket_size": 5e6, "stage3_prefetch_bucket_size": 5e6, "stage3_max_live_parameters": 1e7,
             "stage3_max_reuse_distance": 0}  # ZeRO-3 buffers sized for a small model instead of DeepSpeed's defaults
    expected = {"ddp": 16, "fsdp": 16 / n, "zero1": 4 + 16 / n, "zero2": 4 + 16 / n, "zero3": 20 / n,
                "zero3 (small buffers)": 20 / n}
    engines = [("ddp", []), ("fsdp", ["--fsdp"]), ("zero1", ["--deepspeed", opts.zero_config(1)]),
               ("zero2", ["--deepspeed", opts.zero_config(2)]), ("zero3", ["--deepspeed", opts.zero_config(3)]),
               ("zero3 (small buffers)", ["--deepspeed", opts.zero_config(3, **small)])]
    mib = 2 ** 20
    rows = [f"{opts.memory_model} student ({psi / 1e6:.1f} M parameters, fp32 Adam), {n} processes, batch "
            f"{opts.memory_batch} per process, image {opts.memory_image_size}px, task loss:", "",
            "| engine | state MiB / rank (measured) | textbook MiB / rank | vs DDP | RSS MiB / rank at the step | "
            "peak RSS MiB / rank |", "|---|---|---|---|---|---|"]
    ddp_state = None
    for name, extra in engines:
        res = spawn({"kind": "memory", "argv": argv + extra}, n)
        state = max(r["state_bytes"] for r in res)
        rss, peak = max(r["rss"] for r in res), max(r["max_rss"] for r in res)
        ddp_state = ddp_state or state
        rows.append(f"| {name} | {state / mib:.0f} | {expected[name] * psi / mib:.0f} | {state / ddp_state:.2f} | "
                    f"{rss / mib:.0f} | {peak / mib:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "throughput", "memory"], default="all")
    p.add_argument("--student", default="tiny-student")
    p.add_argument("--teacher", default="tiny-teacher")
    p.add_argument("--batch-size", type=int, default=32, help="throughput: per-process batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-model", default="ViT-B-16")
    p.add_argument("--memory-image-size", type=int, default=64)
    p.add_argument("--memory-batch", type=int, default=2)
    opts = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="scaling-")

    def zero_config(stage: int, **options) -> str:
        path = os.path.join(tmp, f"zero{stage}{'-small' if options else ''}.json")
        with open(path, "w") as f:
            json.dump({"zero_optimization": {"stage": stage, **options}}, f)
        return path

    opts.zero_config = zero_config
    out = []
    if opts.part in ("all", "throughput"):
        out += ["### Throughput (CPU, gloo, 1 thread per process)", ""] + throughput(opts) + [""]
    if opts.part in ("all", "memory"):
        out += ["### Training-state memory per rank", ""] + memory(opts)
    print("\n".join(out))


if __name__ == "__main__":
    main()
