"""One optimizer step, top to bottom: data -> teacher -> student -> distillation loss -> update.

`trainer` is the training.trainer.Trainer that owns the parts; the loop around these steps lives there.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from . import accumulation, distributed
from .data.device import model_image, teacher_image
from .errors import NonFiniteLossError
from .models.towers import mask_keys


def teacher_outputs(trainer, batch: dict, image: torch.Tensor, text: torch.Tensor) -> dict:
    """Teacher embeddings for the batch: from the live frozen teacher, or from the teacher cache (--teacher-cache)."""
    if "teacher_image_emb" in batch:  # joined from the cache by make_sample (training/teacher_cache/join.py)
        return trainer.teacher.outputs_from_batch(batch, trainer.env.device)
    device, dtype = trainer.env.device, trainer.precision.batch_dtype
    t_image = teacher_image(batch, image, _format(trainer.student_bundle), _format(trainer.teacher_bundle), device,
                            dtype)
    t_text = batch_text(batch, "teacher_text").to(device, non_blocking=True) if "teacher_text" in batch else text
    return trainer.teacher(t_image, t_text)


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    finite = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if distributed.world_info()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def batch_text(batch: dict, name: str = "text") -> torch.Tensor:
    """The batch's tokens; with a second caption per image (--captions-per-step 2) both, concatenated [2B, L],
    so each model encodes them in its one forward."""
    if f"{name}_2" in batch:
        return torch.cat([batch[name], batch[f"{name}_2"]])
    return batch[name]


def _format(bundle):
    return bundle.image_format if bundle is not None else None


def model_inputs(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's image (uint8 from the workers, normalised on the device: training.data.device) and tokens."""
    device = trainer.env.device
    image = model_image(batch["image"], _format(trainer.student_bundle), device, trainer.precision.batch_dtype)
    return image, batch_text(batch).to(device, non_blocking=True) if "text" in batch else None


def student_forward(trainer, image: torch.Tensor, text: torch.Tensor, micro_batch: int = 0) -> dict:
    """The student's forward. Patch masks (mfd) are drawn from (seed, step, position in the global batch), so each
    sample of the global batch gets its own mask whatever the number of processes or micro-batches."""
    keys = None
    if trainer.engine.unwrapped.mask_ratio > 0:
        b, world = image.shape[0], trainer.env.world_size
        first = micro_batch * b * world + trainer.env.rank * b
        keys = mask_keys(trainer.config.seed, trainer.step, torch.arange(first, first + b, device=image.device))
    return trainer.model(image, text, mask_keys=keys)


def _caption_halves(tree, n: int, half: int):
    """Half `half` (0, 1) of every text-side tensor of `tree` whose rows are the two captions [2n, ...]."""
    if isinstance(tree, dict):
        return {k: _caption_halves(v, n, half) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_caption_halves(v, n, half) for v in tree)
    return tree[half * n:(half + 1) * n] if torch.is_tensor(tree) and tree.ndim > 0 and tree.shape[0] == 2 * n else tree


def distill_losses(trainer, student: dict, teacher: dict | None, batch: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """The loss terms. With two captions per image (--captions-per-step 2: text rows [2B]) every term is computed
    for the image with each caption and the two results averaged (MobileCLIP's two-caption loss). The student kind
    says what the loss reads (student_kinds.py)."""
    text = student.get("text_features")  # None: image-only students and classifiers
    n = student["image_features"].shape[0] if text is not None else 0
    if trainer.config.data.captions_per_step == 2 and text is not None and text.shape[0] == 2 * n:
        text_keys = ("text_features", "text_intermediates")
        halves = []
        for half in (0, 1):
            s = {k: _caption_halves(v, n, half) if k in text_keys else v for k, v in student.items()}
            t = None
            if teacher is not None:
                t = {k: _caption_halves(v, n, half) if k == "text_features" else v for k, v in teacher.items()}
                if "intermediates" in teacher:
                    t["intermediates"] = {**teacher["intermediates"],
                                          "text": _caption_halves(teacher["intermediates"]["text"], n, half)}
            halves.append(_distill_losses(trainer, s, t, batch))
        return {k: 0.5 * (halves[0][k] + halves[1][k]) for k in halves[0]}
    return _distill_losses(trainer, student, teacher, batch)


def _distill_losses(trainer, student: dict, teacher: dict | None, batch: dict | None) -> dict[str, torch.Tensor]:
    return trainer.loss_fn(**trainer.kind.loss_inputs(student, teacher, batch or {}, trainer.step,
                                                      trainer.env.device))


def _skip_nonfinite(trainer, total: torch.Tensor) -> bool:
    """True (and counted) when the loss is non-finite on any rank: the step is skipped on every rank."""
    state = trainer.state
    if _all_ranks_finite(total):
        state.nonfinite_in_a_row = 0
        return False
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    logging.warning("non-finite loss at step %d: step skipped (%d in a row)", state.step, state.nonfinite_in_a_row)
    if state.nonfinite_in_a_row >= trainer.config.optim.max_nonfinite_steps:
        raise NonFiniteLossError(f"{state.nonfinite_in_a_row} consecutive non-finite losses at step "
                                 f"{trainer.step}: lower --lr, use --precision fp32/amp_bf16 or --grad-clip-norm")
    return True


def train_step(trainer, batch: dict) -> dict[str, torch.Tensor] | None:
    """One optimizer step. Returns the loss terms, or None when the step was skipped for a non-finite loss."""
    image, text = model_inputs(trainer, batch)

    trainer.engine.zero_grad()
    with trainer.precision.autocast():
        teacher = teacher_outputs(trainer, batch, image, text) if trainer.loss_fn.needs_teacher else None
        student = student_forward(trainer, image, text)
        losses = distill_losses(trainer, student, teacher, batch)
    if _skip_nonfinite(trainer, losses["total"]):
        return None
    trainer.engine.backward(losses["total"])
    update(trainer)
    return losses


def accumulated_step(trainer, micro_batches: list[dict]) -> dict[str, torch.Tensor] | None:
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
        losses = distill_losses(trainer, student, teacher)  # --accum-freq > 1: clip students (validate_args)
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


def update(trainer) -> None:
    """After the backward: the engine syncs, clips and steps; then the temperatures are clamped."""
    trainer.engine.update()
    trainer.engine.clamp_logit_scale_()  # open_clip's clamp: the student's temperature never exceeds 100
    if hasattr(trainer.loss_fn, "clamp_scales_"):
        trainer.loss_fn.clamp_scales_()  # the learnable icl/afd scales, the same way
