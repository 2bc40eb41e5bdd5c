"""The training step and epoch, top to bottom: data -> teacher -> student -> distillation loss -> update."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import distributed
from .checkpoint import rng_state


class NonFiniteLossError(RuntimeError):
    pass


def autocast_for(precision: str, device: torch.device):
    """open_clip's precision names: amp = fp16 autocast on CUDA (bf16 on CPU), amp_bf16 = bf16 autocast."""
    if precision == "amp":
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)
    if precision == "amp_bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def input_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


@dataclass
class Trainer:
    """Everything one step touches. Built by main.py; checkpoint.py saves and restores its state."""

    args: Any
    env: distributed.DistEnv
    model: torch.nn.Module  # StudentModel, possibly wrapped by DDP
    student: torch.nn.Module  # the bare open_clip student (what gets exported)
    teacher: torch.nn.Module | None
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: Any
    metrics: Any
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    skipped: Counter = field(default_factory=Counter)

    def state_dict(self) -> dict:
        return {
            "model": self.student.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "nonfinite_total": self.nonfinite_total,
            "skipped": dict(self.skipped),
            "rng": rng_state(),
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, list, dict,
                                                                                  type(None)))},
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.skipped = Counter(state.get("skipped", {}))


def teacher_outputs(trainer: Trainer, batch: dict, image: torch.Tensor, text: torch.Tensor) -> dict:
    """Teacher embeddings for the batch: from the live frozen teacher, or from the teacher cache (--teacher-cache)."""
    if "teacher_image_emb" in batch:  # joined from the cache by make_sample (training/teacher_cache.py)
        return trainer.teacher.outputs_from_batch(batch, trainer.env.device)
    device, dtype = trainer.env.device, input_dtype(trainer.args.precision)
    t_image = batch["teacher_image"].to(device, dtype=dtype, non_blocking=True) if "teacher_image" in batch else image
    t_text = batch["teacher_text"].to(device, non_blocking=True) if "teacher_text" in batch else text
    return trainer.teacher(t_image, t_text)


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    finite = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if distributed.world_info()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(trainer: Trainer, batch: dict) -> dict[str, torch.Tensor] | None:
    """One optimizer step. Returns the loss terms, or None when the step was skipped for a non-finite loss."""
    args, device = trainer.args, trainer.env.device
    autocast = autocast_for(args.precision, device)
    image = batch["image"].to(device, dtype=input_dtype(args.precision), non_blocking=True)
    text = batch["text"].to(device, non_blocking=True)

    trainer.optimizer.zero_grad(set_to_none=True)
    with autocast():
        teacher = teacher_outputs(trainer, batch, image, text) if trainer.loss_fn.needs_teacher else None
        student = trainer.model(image, text)
        losses = trainer.loss_fn(
            student_image=student["image_features"], student_text=student["text_features"],
            student_scale=student["logit_scale"],
            teacher_image=teacher["image_features"] if teacher else None,
            teacher_text=teacher["text_features"] if teacher else None,
            teacher_scale=teacher["logit_scales"] if teacher else None,
            step=trainer.step,
            student_intermediates={"image": student["image_intermediates"], "text": student["text_intermediates"]},
            teacher_intermediates=teacher.get("intermediates") if teacher else None,
        )
    total = losses["total"]
    if not _all_ranks_finite(total):
        trainer.nonfinite_in_a_row += 1
        trainer.nonfinite_total += 1
        logging.warning("non-finite loss at step %d: step skipped (%d in a row)", trainer.step,
                        trainer.nonfinite_in_a_row)
        if trainer.nonfinite_in_a_row >= args.max_nonfinite_steps:
            raise NonFiniteLossError(f"{trainer.nonfinite_in_a_row} consecutive non-finite losses at step "
                                     f"{trainer.step}: lower --lr, use --precision fp32/amp_bf16 or --grad-clip-norm")
        return None
    trainer.nonfinite_in_a_row = 0

    if trainer.scaler is not None:
        trainer.scaler.scale(total).backward()
        trainer.scaler.unscale_(trainer.optimizer)
    else:
        total.backward()
    # Loss-side parameters sit outside DDP: average their gradients like DDP does for the student.
    distributed.all_reduce_mean_([p.grad for p in trainer.loss_fn.parameters() if p.requires_grad])
    if args.grad_clip_norm is not None:
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm)
    if trainer.scaler is not None:
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    else:
        trainer.optimizer.step()
    with torch.no_grad():  # open_clip's clamp: the student's temperature never exceeds 100
        trainer.student.logit_scale.clamp_(0, math.log(100))
    return losses


def train_one_epoch(trainer: Trainer, data, save_fn, total_steps_cap: int | None) -> bool:
    """Runs the rest of the current epoch; returns False when --max-steps stopped training early."""
    args = trainer.args
    trainer.model.train()
    num_batches = data.num_batches
    end = time.perf_counter()
    window = Counter()
    for batch in data.dataloader:
        data_time = time.perf_counter() - end
        trainer.schedule(trainer.step)
        trainer.skipped.update(batch.get("skipped", {}))
        losses = train_step(trainer, batch)
        trainer.batch_in_epoch += 1
        if losses is not None:
            trainer.step += 1
        batch_time = time.perf_counter() - end
        window["batch_time"] += batch_time
        window["data_time"] += data_time
        window["n"] += 1
        end = time.perf_counter()

        last = trainer.batch_in_epoch == num_batches
        if losses is not None and (trainer.step % args.log_every_n_steps == 0 or last):
            log_step(trainer, losses, window, len(batch["key"]))
            window = Counter()
        if args.save_every_n_steps and trainer.step % args.save_every_n_steps == 0 and not last:
            save_fn(f"step_{trainer.step}.pt")
        if total_steps_cap is not None and trainer.step >= total_steps_cap:
            if not last:
                save_fn(f"step_{trainer.step}.pt")
            return False
    return True


def log_step(trainer: Trainer, losses: dict, window: Counter, batch_size: int) -> None:
    metrics: dict[str, float] = {name: float(v.detach()) for name, v in losses.items()}
    metrics["lr"] = trainer.optimizer.param_groups[0]["lr"]
    metrics["epoch"] = trainer.epoch + trainer.batch_in_epoch / max(1, trainer.args._num_batches)
    metrics["student_scale"] = float(trainer.student.logit_scale.detach().exp())
    for name, weight in trainer.loss_fn.effective_weights(trainer.step).items():
        metrics[f"weight/{name}"] = float(weight)
    n = max(1, window["n"])
    world = trainer.env.world_size
    metrics["samples_per_s"] = batch_size * world * n / max(window["batch_time"], 1e-9)
    metrics["data_time"] = window["data_time"] / n
    metrics["batch_time"] = window["batch_time"] / n
    # Bad samples are counted, never fatal: totals summed over ranks (every rank takes part in the gather).
    for name, count in sorted(distributed.sum_counters(trainer.skipped).items()):
        metrics[f"skipped/{name}"] = float(count)
    metrics["nonfinite_skipped_steps"] = float(trainer.nonfinite_total)
    trainer.metrics.log(trainer.step, metrics)
