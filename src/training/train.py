"""The training step and epoch, top to bottom: data -> teacher -> student -> distillation loss -> update."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import accumulation, distributed
from .checkpoint import rng_state
from .distill.features import mask_keys
from .precision import Precision, autocast_for, input_dtype, resolve  # noqa: F401  (autocast_for: re-exported)
from .preemption import StopRequest


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Trainer:
    """Everything one step touches. Built by main.py; checkpoint.py saves and restores its state."""

    args: Any
    env: distributed.DistEnv
    model: torch.nn.Module  # StudentModel, wrapped by the engine (DDP, FSDP2, DeepSpeed) when distributed
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
    engine: Any = None  # parallel.Engine (from parallel.create_engine): how the student is wrapped and stepped
    precision: Precision | None = None  # resolved from args.precision when not given
    stop: StopRequest | None = None  # SIGUSR1/SIGTERM: finish the step, save, exit (training/preemption.py)

    def __post_init__(self):
        if self.precision is None:
            self.precision = resolve(self.args.precision, self.env.device, getattr(self.args, "amp_fp16_on_cpu", False))
        if self.engine is None:
            raise TypeError("Trainer needs the engine that wrapped its model (training.parallel.create_engine)")

    def state_dict(self) -> dict:
        """Collective under FSDP2/DeepSpeed (full tensors gathered to rank 0); every rank calls it, rank 0 saves."""
        return {
            "model": self.engine.model_state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.engine.optimizer_state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.env.world_size,
            "nonfinite_total": self.nonfinite_total,
            "skipped": distributed.sum_counters(self.skipped),  # the run's totals (collective)
            "rng": distributed.gather_objects(rng_state(self.env.device)),  # each rank's own generators
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, list, dict,
                                                                                  type(None)))},
        }

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_model_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.engine.load_optimizer_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        # the saved totals live on rank 0 again: logging sums the ranks' counters
        self.skipped = Counter(state.get("skipped", {})) if self.env.rank == 0 else Counter()


def teacher_outputs(trainer: Trainer, batch: dict, image: torch.Tensor, text: torch.Tensor) -> dict:
    """Teacher embeddings for the batch: from the live frozen teacher, or from the teacher cache (--teacher-cache)."""
    if "teacher_image_emb" in batch:  # joined from the cache by make_sample (training/teacher_cache.py)
        return trainer.teacher.outputs_from_batch(batch, trainer.env.device)
    device, dtype = trainer.env.device, trainer.precision.batch_dtype
    t_image = batch["teacher_image"].to(device, dtype=dtype, non_blocking=True) if "teacher_image" in batch else image
    t_text = batch["teacher_text"].to(device, non_blocking=True) if "teacher_text" in batch else text
    return trainer.teacher(t_image, t_text)


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    finite = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if distributed.world_info()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def model_inputs(trainer: Trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    device = trainer.env.device
    image = batch["image"].to(device, dtype=trainer.precision.batch_dtype, non_blocking=True)
    return image, batch["text"].to(device, non_blocking=True)


def student_forward(trainer: Trainer, image: torch.Tensor, text: torch.Tensor, micro_batch: int = 0) -> dict:
    """The student's forward. Patch masks (mfd) are drawn from (seed, step, position in the global batch), so each
    sample of the global batch gets its own mask whatever the number of processes or micro-batches."""
    keys = None
    if trainer.engine.student_model.mask_ratio > 0:
        b, world = image.shape[0], trainer.env.world_size
        first = micro_batch * b * world + trainer.env.rank * b
        keys = mask_keys(trainer.args.seed, trainer.step, torch.arange(first, first + b, device=image.device))
    return trainer.model(image, text, mask_keys=keys)


def distill_losses(trainer: Trainer, student: dict, teacher: dict | None) -> dict[str, torch.Tensor]:
    return trainer.loss_fn(
        student_image=student["image_features"], student_text=student["text_features"],
        student_scale=student["logit_scale"],
        teacher_image=teacher["image_features"] if teacher else None,
        teacher_text=teacher["text_features"] if teacher else None,
        teacher_scale=teacher["logit_scales"] if teacher else None,
        step=trainer.step,
        student_intermediates={"image": student["image_intermediates"], "text": student["text_intermediates"]},
        teacher_intermediates=teacher.get("intermediates") if teacher else None,
    )


def _skip_nonfinite(trainer: Trainer, total: torch.Tensor) -> bool:
    """True (and counted) when the loss is non-finite on any rank: the step is skipped on every rank."""
    if _all_ranks_finite(total):
        trainer.nonfinite_in_a_row = 0
        return False
    trainer.nonfinite_in_a_row += 1
    trainer.nonfinite_total += 1
    logging.warning("non-finite loss at step %d: step skipped (%d in a row)", trainer.step,
                    trainer.nonfinite_in_a_row)
    if trainer.nonfinite_in_a_row >= trainer.args.max_nonfinite_steps:
        raise NonFiniteLossError(f"{trainer.nonfinite_in_a_row} consecutive non-finite losses at step "
                                 f"{trainer.step}: lower --lr, use --precision fp32/amp_bf16 or --grad-clip-norm")
    return True


def train_step(trainer: Trainer, batch: dict) -> dict[str, torch.Tensor] | None:
    """One optimizer step. Returns the loss terms, or None when the step was skipped for a non-finite loss."""
    image, text = model_inputs(trainer, batch)

    trainer.engine.zero_grad()
    with trainer.precision.autocast():
        teacher = teacher_outputs(trainer, batch, image, text) if trainer.loss_fn.needs_teacher else None
        student = student_forward(trainer, image, text)
        losses = distill_losses(trainer, student, teacher)
    if _skip_nonfinite(trainer, losses["total"]):
        return None
    trainer.engine.backward(losses["total"])
    update(trainer)
    return losses


def accumulated_step(trainer: Trainer, micro_batches: list[dict]) -> dict[str, torch.Tensor] | None:
    """One optimizer step over K micro-batches whose losses are those of the whole K·B batch (--accum-freq K).

    GradCache (training/accumulation.py): 1) forward every micro-batch without a graph, caching the student and
    teacher outputs and the RNG state before each student forward; 2) evaluate the losses once on the concatenation
    and backprop them to the cached student outputs (and the loss-side heads); 3) re-run each micro-batch's student
    forward with a graph, from the same RNG state (same dropout; patch masks are keyed by position), and backprop the
    cached output gradients.
    """
    engine, device = trainer.engine, trainer.env.device
    autocast = trainer.precision.autocast
    inputs = [model_inputs(trainer, batch) for batch in micro_batches]
    sizes = [image.shape[0] for image, _ in inputs]

    engine.zero_grad()
    rng, students, teachers = [], [], []
    with torch.no_grad(), autocast():
        for i, (batch, (image, text)) in enumerate(zip(micro_batches, inputs)):
            teachers.append(teacher_outputs(trainer, batch, image, text) if trainer.loss_fn.needs_teacher else None)
            rng.append(accumulation.rng_state(device))
            students.append(student_forward(trainer, image, text, micro_batch=i))
    rng_after = accumulation.rng_state(device)
    student, leaves = accumulation.as_leaves(accumulation.concat(students))
    teacher = accumulation.concat(teachers)
    del students, teachers
    with autocast():
        losses = distill_losses(trainer, student, teacher)
    if _skip_nonfinite(trainer, losses["total"]):
        return None
    engine.scale_loss(losses["total"]).backward()  # gradients of the cached outputs and of the loss-side heads

    for i, (image, text) in enumerate(inputs):
        last = i == len(inputs) - 1
        # BatchNorm: the cached pass already updated the running statistics with this micro-batch
        with engine.micro_batch(last=last), accumulation.frozen_norm_statistics(trainer.model):
            accumulation.set_rng_state(rng[i], device)
            with autocast():
                outputs = student_forward(trainer, image, text, micro_batch=i)
            engine.backward(accumulation.surrogate(outputs, leaves, i, sizes, last), prescaled=True)
    accumulation.set_rng_state(rng_after, device)
    update(trainer)
    return losses


def update(trainer: Trainer) -> None:
    """After the backward: the engine syncs, clips and steps; then the temperatures are clamped."""
    trainer.engine.update()
    trainer.engine.clamp_logit_scale_()  # open_clip's clamp: the student's temperature never exceeds 100
    if hasattr(trainer.loss_fn, "clamp_scales_"):
        trainer.loss_fn.clamp_scales_()  # the learnable icl/afd scales, the same way


def train_one_epoch(trainer: Trainer, data, save_fn, total_steps_cap: int | None) -> bool:
    """Runs the rest of the current epoch; returns False when --max-steps stopped training early."""
    args = trainer.args
    trainer.model.train()
    num_batches = data.num_batches
    end = time.perf_counter()
    window = Counter()
    for batch in data.dataloader:  # a batch, or with --accum-freq K a list of K micro-batches
        data_time = time.perf_counter() - end
        micro = batch if isinstance(batch, list) else [batch]
        trainer.schedule(trainer.step)
        for b in micro:
            trainer.skipped.update(b.get("skipped", {}))
        losses = accumulated_step(trainer, micro) if len(micro) > 1 else train_step(trainer, micro[0])
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
            log_step(trainer, losses, window, sum(len(b["key"]) for b in micro))
            window = Counter()
        periodic = bool(args.save_every_n_steps) and trainer.step % args.save_every_n_steps == 0 and not last
        capped = total_steps_cap is not None and trainer.step >= total_steps_cap and not last
        preempted = trainer.stop is not None and trainer.stop.should_stop()  # collective: every rank, every step
        if periodic or capped or preempted:
            save_fn(f"step_{trainer.step}.pt")
        if capped or preempted:
            return False
    return True  # at an epoch end the caller saves epoch_N.pt, also when --max-steps lands exactly there


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
