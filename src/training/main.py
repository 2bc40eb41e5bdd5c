"""`python -m training.main` (also under torchrun / srun): distil a teacher CLIP into a student CLIP."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed, parallel
from .accumulation import group_micro_batches
from .checkpoint import atomic_save, check_resume, latest_checkpoint, load_checkpoint, restore_rank_rng, write_latest
from .config import Config
from .data import DataInfo, DataTransforms, get_data
from .data.transforms import EvalTransform, PairedViews
from .distill.features import check_masking_supported
from .logger import MetricLogger, setup_logging
from .models import ModelBundle, StudentModel, Teacher, create_student, create_teacher, embed_dim
from .errors import UsageError
from .params import parse_args
from .precision import make_grad_scaler, resolve
from .preemption import StopRequest
from .scheduler import LRSchedule
from .train import NonFiniteLossError, Trainer, train_one_epoch

STOP_FILE = "stop"  # <logs>/<name>/stop: finish the step, checkpoint and exit (the sbatch scripts' USR1 trap)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(args) -> str:
    if args.name:
        return args.name
    if args.resume == "latest":
        raise UsageError("--resume latest needs --name (the run folder to resume)")
    teacher = "-".join(os.path.splitext(os.path.basename(t))[0] for t in args.teacher_list) or "none"
    model = os.path.splitext(os.path.basename(args.model))[0]
    return f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-model_{model}-teacher_{teacher}-lr_{args.lr:g}-b_{args.batch_size}"


def param_groups(student: torch.nn.Module, loss_fn: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's grouping for the student (no weight decay on gains, biases, norms and the logit scale); the loss
    module names its own no-decay parameters (learnable scales, log-variances, biases)."""
    def student_no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    loss_no_wd = loss_fn.no_weight_decay_names()
    decay, no_wd = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_wd if student_no_decay(name, p) else decay).append(p)
    for name, p in loss_fn.named_parameters():
        if p.requires_grad:
            (no_wd if name in loss_no_wd else decay).append(p)
    return [{"params": no_wd, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


# Captions that tell tokenizers apart: case, accents, digits, punctuation, and a length past every context.
TOKENIZER_PROBES = ["A photo of a Café, number 42!", "THE quick brown fox — jumps over the lazy dog?",
                    "naïve façade 東京 emoji 🙂 tab\there", " ".join(f"word{i}" for i in range(300))]


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers give the same ids for every probe caption (their classes say nothing: SigLIP's T5
    and SigLIP 2's Gemma tokenizers are both HFTokenizer with context 64, with different vocabularies)."""
    if a is b:
        return True
    try:
        ta, tb = a(TOKENIZER_PROBES), b(TOKENIZER_PROBES)
    except Exception:  # a tokenizer that cannot take the probes cannot be shown to be the same
        return False
    return ta.shape == tb.shape and bool(torch.equal(ta, tb))


def build_transforms(args, student_bundle, teacher_bundle, teacher_cache=None) -> DataTransforms:
    teacher_fmt = teacher_bundle.image_format if teacher_bundle else None
    teacher_tok = None
    if teacher_bundle and not same_tokenizer(teacher_bundle.tokenizer, student_bundle.tokenizer):
        teacher_tok = teacher_bundle.tokenizer
        logging.info("the teacher tokenises captions with its own tokenizer (%s, context %d)",
                     type(teacher_tok).__name__, teacher_bundle.context_length)
    return DataTransforms(
        tokenizer=student_bundle.tokenizer, teacher_tokenizer=teacher_tok,
        train_views=PairedViews(student_bundle.image_format, teacher_fmt, train=True, seed=args.seed),
        val_views=PairedViews(student_bundle.image_format, teacher_fmt, train=False),
        teacher_cache=teacher_cache,
    )


@dataclass
class Run:
    """What `build` assembles from the flags: the trainer, its data, and where the run writes."""

    trainer: Trainer
    data: DataInfo
    student_bundle: ModelBundle
    log_dir: str | None
    ckpt_dir: str | None


def build(args, env: distributed.DistEnv) -> Run:
    """Models, loss, data, optimizer and schedule from parsed flags (also used by benchmarks and tests)."""
    from .distill import distill_loss_from_args

    log_dir = os.path.join(args.logs, args.name) if args.logs and args.name else None
    seed_everything(args.seed)  # same seed on every rank: identical student init and loss-side heads
    precision = resolve(args.precision, env.device, args.amp_fp16_on_cpu)
    sections = Config.from_args(args)
    parallel.check_config(sections.parallel)
    engine_name = sections.parallel.engine
    # --precision bf16: FSDP2 and DeepSpeed cast the weights themselves (fp32 master weights); DDP and Horovod
    # train open_clip's bf16 model, as open_clip does
    student_bundle = create_student(args, env.device, low_precision="bf16" if precision.low_precision_weights
                                    and engine_name in ("ddp", "horovod") else None)
    cache = None
    if getattr(args, "teacher_cache", None):  # cached teacher embeddings: no teacher is built or run
        from .teacher_cache import open_for_training

        cache, teacher = open_for_training(args)
        teacher_bundle = None
    else:
        teacher, teacher_bundle = create_teacher(args, env.device)
    student = student_bundle.model
    teacher_dims = teacher.embed_dims if teacher is not None else []
    members = list(teacher.members) if isinstance(teacher, Teacher) else None  # feat needs the live towers
    loss_fn = distill_loss_from_args(args, embed_dim(student), teacher_dims, student_model=student,
                                     teacher_model=members).to(env.device)
    if loss_fn.needs_teacher and teacher is None:
        raise UsageError("the --distill spec has teacher terms but no --teacher was given")
    loss_fn.sync_()
    logging.info("distillation: %s", loss_fn.describe() if hasattr(loss_fn, "describe") else loss_fn)

    wrapped = StudentModel(student).to(env.device)
    wrapped.mask_ratio = float(getattr(loss_fn, "mask_ratio", 0.0) or 0.0)
    if wrapped.mask_ratio > 0:
        check_masking_supported(student.visual)  # mfd: ViT students only, clear error otherwise
    if loss_fn.needs_intermediates:  # feat: both models return the chosen layers' tokens from their one forward
        student_layers = loss_fn.feat_layers_for("student")
        wrapped.image_layers, wrapped.text_layers = student_layers.get("image"), student_layers.get("text")
        teacher.set_intermediate_layers(loss_fn.feat_layers_for("teacher"), member=args.kd_teacher_member or 0)
    scaler = make_grad_scaler(precision, sharded=engine_name == "fsdp")
    # DDP, FSDP2, DeepSpeed or Horovod (training/parallel/); the optimizer is built after wrapping
    optim = sections.optim
    engine = parallel.create_engine(
        sections.parallel, env, model=wrapped, loss_fn=loss_fn, teacher=teacher,
        make_groups=lambda: param_groups(student, loss_fn, optim.wd),
        make_optimizer=lambda groups: torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps,
                                                        betas=(optim.beta1, optim.beta2)),
        scaler=scaler, precision=precision, batch_size=sections.data.batch_size, accum_freq=optim.accum_freq,
        grad_clip_norm=optim.grad_clip_norm, torchcompile=sections.model.torchcompile)
    logging.info("student engine: %s", engine.describe())

    transforms = build_transforms(args, student_bundle, teacher_bundle, cache)
    data = get_data(args, transforms, epoch=0, image_size=student_bundle.image_format.size)["train"]
    data = group_micro_batches(data, args.accum_freq)  # --accum-freq K: K micro-batches per optimizer step
    args._num_batches = data.num_batches
    total_steps = data.num_batches * args.epochs

    optimizer = engine.optimizer
    metrics = MetricLogger(os.path.join(log_dir, "tensorboard") if log_dir and "tensorboard" in args.report_to
                           else None, enabled=env.is_master)
    schedule = LRSchedule(optimizer, args.lr, args.warmup, total_steps, args.lr_scheduler)
    trainer = Trainer(args=args, env=env, model=engine.model, student=student, teacher=teacher, loss_fn=loss_fn,
                      optimizer=optimizer, scaler=scaler, schedule=schedule, metrics=metrics, engine=engine,
                      precision=precision)
    # Identical weights everywhere are built; from here on each rank draws its own randomness (dropout, drop-path),
    # as open_clip does. Patch masks and data augmentation have their own seeds and stay process-count independent.
    seed_everything(args.seed + env.rank)
    return Run(trainer, data, student_bundle, log_dir, os.path.join(log_dir, "checkpoints") if log_dir else None)


def run(argv=None) -> int:
    args = parse_args(argv)
    parallel.launch(Config.from_args(args).parallel)  # --horovod: hvd.init() tells each process its rank
    env = distributed.init_distributed(args.device, args.dist_backend, args.dist_url)
    args.name = run_name(args)
    log_dir = os.path.join(args.logs, args.name) if args.logs else None
    setup_logging(os.path.join(log_dir, "out.log") if log_dir else None, env.is_master)
    logging.info("rank %d/%d on %s", env.rank, env.world_size, env.device)
    from .evaluate import evaluate_in_training, validate_eval_args

    validate_eval_args(args)  # a bad eval path fails now, not after the first epoch
    built = build(args, env)
    trainer, data, ckpt_dir = built.trainer, built.data, built.ckpt_dir

    resume_path = args.resume
    if resume_path == "latest":
        resume_path = latest_checkpoint(ckpt_dir) if ckpt_dir else None
        if resume_path is None:
            logging.info("--resume latest: no checkpoint in %s yet, starting fresh", ckpt_dir)
    if resume_path:
        state = load_checkpoint(resume_path)
        for note in check_resume(state, args, env.world_size, data.num_batches):
            logging.warning("resume: %s", note)
        trainer.load_state_dict(state)
        if not restore_rank_rng(state["rng"], env.rank, env.world_size, env.device):
            logging.warning("resume: the checkpoint has no random state for rank %d of %d: reseeded from the seed",
                            env.rank, env.world_size)
        if state.get("data_state") is not None and "load_state_fn" in data.extra:
            data.extra["load_state_fn"](state["data_state"])  # WebDataset: per-worker stream positions
        logging.info("resumed from %s at epoch %d, step %d, batch %d", resume_path, trainer.epoch, trainer.step,
                     trainer.batch_in_epoch)

    def save(filename: str) -> None:
        if ckpt_dir is None:
            return
        state = trainer.state_dict()  # every rank builds it (collectives under FSDP); rank 0 writes
        if "state_fn" in data.extra:  # WebDataset stream positions differ per rank: keep all of them
            state["data_state"] = distributed.gather_objects(data.extra["state_fn"]())
        if env.is_master:
            atomic_save(state, os.path.join(ckpt_dir, filename))
            write_latest(ckpt_dir, filename)
            logging.info("saved %s", os.path.join(ckpt_dir, filename))
        distributed.barrier()

    trainer.stop = StopRequest(os.path.join(log_dir, STOP_FILE) if log_dir else None, env.device,
                               env.is_master).install()
    eval_transform = EvalTransform(built.student_bundle.image_format)
    while trainer.epoch < args.epochs:
        if trainer.batch_in_epoch >= data.num_batches:
            trainer.epoch, trainer.batch_in_epoch = trainer.epoch + 1, 0
            continue
        data.set_epoch(trainer.epoch, trainer.batch_in_epoch)
        if not train_one_epoch(trainer, data, save, args.max_steps):
            break  # --max-steps reached (a checkpoint was written)
        completed = trainer.epoch + 1
        trainer.epoch, trainer.batch_in_epoch = completed, 0
        stop = args.max_steps is not None and trainer.step >= args.max_steps
        periodic = args.save_frequency > 0 and completed % args.save_frequency == 0  # 0: no periodic epoch saves
        if periodic or completed == args.epochs or stop:  # the final epoch is always saved (resume, export)
            save(f"epoch_{completed}.pt")
        with trainer.engine.unsharded():  # FSDP2/ZeRO-3: the bare student's weights gathered for evaluation
            results = evaluate_in_training(trainer.student, eval_transform, built.student_bundle.tokenizer, args,
                                           completed, env.device)
        if results:
            trainer.metrics.log(trainer.step, results, prefix="eval")
        if stop:
            break
    trainer.stop.uninstall()
    if trainer.stop.agreed_reason:
        logging.info("stopped at step %d (%s): checkpoint written, continue with --resume latest --name %s",
                     trainer.step, trainer.stop.agreed_reason, args.name)
    trainer.metrics.close()
    distributed.cleanup()
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
