"""Worker for the engine tests (tests/test_parallel.py): runs a list of training jobs inside one process group.

A job builds the trainer from CLI flags (training.trainer.Trainer), optionally resumes a checkpoint, then runs the
real loop (Trainer.run) to a mid step and on to a final step, and rank 0 records: the first
step's full student and loss-side gradients (taken between backward and optimizer step, whatever the engine), every
logged loss, the state right after resuming, and the mid and final checkpoints (Trainer.state_dict: the canonical
format). The mid checkpoint is also written alone, for the jobs that resume from it. A job may keep fewer parts of each
state (`record_parts`) and skip the gradients (`record_grads`): the whole matrix would otherwise write gigabytes.
Running many jobs in one spawn keeps the test time down (imports and process-group set-up happen once).
"""

from __future__ import annotations

import copy
import os

import torch


def run_jobs(rank: int, world_size: int, port: int, jobs: list[dict], out_dir: str, device: str = "cpu") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cuda" if device.startswith("cuda") else "cpu")
    torch.set_num_threads(1)
    from training import distributed

    env = distributed.init_distributed(device)
    try:
        for job in jobs:
            run_job(env, job, out_dir)
    finally:
        distributed.cleanup()


def run_job(env, job: dict, out_dir: str) -> None:
    from training import distributed
    from training.checkpoint import load_checkpoint
    from training.params import UsageError, parse_config
    from training.precision import module_input_dtype
    from training.trainer import Trainer

    if job.get("sys_path"):  # e.g. the Horovod stand-in (tests/fake_horovod)
        import sys

        sys.path.insert(0, job["sys_path"])
    config = parse_config(job["argv"])
    try:
        trainer = Trainer(config, env)
    except UsageError as exc:  # a combination the CLI refuses at start-up (every rank refuses it the same way)
        if env.is_master:
            torch.save({"refused": str(exc)}, os.path.join(out_dir, f"{job['name']}.pt"))
        distributed.barrier()
        return
    record: dict = {"losses": [], "grads": None}
    parts = job.get("record_parts")

    def save(filename: str) -> None:
        state = trainer.state_dict()  # collective
        if env.is_master:  # a deep copy: the DDP state_dict holds references to live tensors
            if filename == "mid":
                torch.save(state, os.path.join(out_dir, f"{job['name']}.mid.ckpt"))
            record[filename] = copy.deepcopy({k: v for k, v in state.items() if parts is None or k in parts})

    if job.get("resume"):
        state = load_checkpoint(job["resume"])
        trainer.load_state_dict(state)  # every part, each rank's own RNG included
        save("reloaded")

    engine = trainer.engine
    real_step = engine.step

    def step() -> None:  # the first step's gradients, between backward and update
        if record["grads"] is None and job.get("record_grads", True):
            grads = engine.full_grads()
            grads.update({f"loss.{n}": p.grad.detach().clone() for n, p in trainer.loss_fn.named_parameters()
                          if p.grad is not None})
            record["grads"] = grads
        real_step()

    engine.step = step
    real_log = trainer.metrics.log

    def log(step, metrics, prefix="train"):
        if prefix == "train":
            record["losses"].append({k: v for k, v in metrics.items() if k in ("total", "task", "crd", "icl", "fd")})
            record.setdefault("scale", []).append(trainer.scaler.get_scale() if trainer.scaler is not None else None)
        return real_log(step, metrics, prefix)

    trainer.metrics.log = log
    for cap, filename in ((job["mid"], "mid"), (job["steps"], "final")):
        if trainer.step >= cap:
            continue
        trainer.run(max_steps=cap)
        save(filename)
    # the bare student called directly (as evaluation does), inside the engine's unsharded() context
    student = trainer.student
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=gen).to(env.device)
    text = torch.randint(1, 1000, (2, student.context_length), generator=gen).to(env.device)
    student.eval()
    with trainer.engine.unsharded(), torch.no_grad():
        image = image.to(module_input_dtype(student.visual))  # as evaluation does (bf16 students)
        record["embeddings"] = (student.encode_image(image).float().cpu(), student.encode_text(text).float().cpu())
    if env.is_master:
        torch.save(record, os.path.join(out_dir, f"{job['name']}.pt"))
    distributed.barrier()
