"""The Trainer: built from a Config, it owns every part of a run; `train()` is the loop.

    trainer = Trainer(config, env)   # models, loss, engine, data, schedule, checkpoints, evaluation
    trainer.train()                  # resume, then step until --epochs, --max-steps or a stop request

One optimizer step (data -> teacher -> student -> loss -> update) lives in training/train.py; each component decides
its own cadence: the checkpoint manager when to save, the evaluator what is due at an epoch end, the loop when to log.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from . import distributed, parallel
from .accumulation import group_micro_batches
from .checkpoint import CheckpointManager
from .config import Config, DistillConfig
from .data import DataTransforms, get_data
from .data.device import BatchDecoder
from .data.transforms import EvalTransform, PairedViews
from .distill import resolve_spec
from .errors import TeacherCacheError, UsageError
from .eval.hook import TrainingEvaluator
from .logger import MetricLogger, WandbRun
from .models import ModelBundle, StudentModel, Teacher, create_teacher
from .models.inherit import init_student_from_teacher
from .models.teacher import teacher_dtype
from .models.towers import check_masking_supported
from .optim import create_optimizer, param_groups
from .precision import make_grad_scaler, resolve
from .preemption import StopRequest
from .progress import TrainProgress
from .remote_sync import RemoteSync
from .scheduler import LRSchedule
from .student_kinds import student_kind
from .tokenizers import same_tokenizer
from .train import accumulated_step, train_step

STOP_FILE = "stop"  # <logs>/<name>/stop: finish the step, checkpoint and exit (the sbatch scripts' USR1 trap)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    is_master: bool = True
    step: int = 0  # optimizer steps taken (a step skipped for a non-finite loss does not count)
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad samples by reason, this rank's since the start/resume

    def state_dict(self) -> dict:  # collective (the skipped totals are summed over ranks)
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "nonfinite_total": self.nonfinite_total, "skipped": distributed.sum_counters(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        # the saved totals live on rank 0 again: logging sums the ranks' counters
        self.skipped = Counter(state.get("skipped", {})) if self.is_master else Counter()


def build_transforms(student: ModelBundle, teacher: ModelBundle | None, seed: int, cache=None,
                     encoded: bool = False) -> DataTransforms:
    """One random view rendered for both models; the teacher's own tokenizer only when it differs. `encoded`
    (--decode-device cpu|cuda): the training views are shipped undecoded and rendered by the trainer's BatchDecoder."""
    teacher_fmt = teacher.image_format if teacher else None
    teacher_tok = None
    if teacher and student.tokenizer is not None and not same_tokenizer(teacher.tokenizer, student.tokenizer):
        teacher_tok = teacher.tokenizer
        logging.info("the teacher tokenises captions with its own tokenizer (%s, context %d)",
                     type(teacher_tok).__name__, teacher.context_length)
    return DataTransforms(
        tokenizer=student.tokenizer, teacher_tokenizer=teacher_tok,
        train_views=PairedViews(student.image_format, teacher_fmt, train=True, seed=seed, encoded=encoded),
        val_views=PairedViews(student.image_format, teacher_fmt, train=False), teacher_cache=cache)


def open_teacher(config: Config, device: torch.device):
    """(teacher, its bundle, the cache): the live frozen teacher, or with --teacher-cache the stand-in that reads
    cached embeddings (no teacher is built or run; the bundle is then None)."""
    if config.data.datacompdr_teachers:  # DataCompDR shards carry the teachers' embeddings (training/data/datacompdr.py)
        return datacompdr_teacher(config), None, None
    if not config.teacher.teacher_cache:
        # built in fp32 (--init-from-teacher copies these weights); prepare_teacher casts it once the student is built
        teacher, bundle = create_teacher(config.teacher, device, None, config.model.cache_dir)
        return teacher, bundle, None
    from .teacher_cache import open_for_training

    distill = config.distill
    if resolve_spec(distill.distill, distill.recipe, distill.overrides).needs("teacher_internals"):
        raise TeacherCacheError("the feat term needs the teacher's intermediate tokens, which a teacher-embedding "
                                "cache does not store: drop feat from --distill or train without --teacher-cache")
    cache, teacher = open_for_training(config.teacher, config.data, shard_teacher=config.parallel.fsdp_shard_teacher)
    return teacher, None, cache


def datacompdr_teacher(config: Config):
    """The stand-in teacher of a DataCompDR run (the one a teacher cache uses): no model; widths from
    --datacompdr-teachers, scales from --teacher-logit-scales, embeddings from the batch."""
    from .data.datacompdr import parse_widths
    from .distill.spec import parse_member_values
    from .teacher_cache.reader import CachedTeacher

    widths = parse_widths(config.data.datacompdr_teachers)
    scales = parse_member_values(config.distill.teacher_logit_scales, "--teacher-logit-scales")
    return CachedTeacher({"teachers": [{"name": f"datacompdr/{m}", "embed_dim": d, "logit_scale": s}
                                       for m, (d, s) in enumerate(zip(widths, scales))]})


def student_forward_module(student, loss_fn, teacher, distill: DistillConfig, device: torch.device) -> StudentModel:
    """The student's forward as the loss needs it: masked patches (mfd), the chosen layers' tokens (feat; the
    teacher is told its layers too)."""
    forward = StudentModel(student).to(device)
    forward.mask_ratio = float(loss_fn.mask_ratio or 0.0)
    if forward.mask_ratio > 0:
        check_masking_supported(student.visual)  # mfd: ViT students only, clear error otherwise
    if loss_fn.needs_intermediates:  # feat: both models return the chosen layers' tokens from their one forward
        layers = loss_fn.feat_layers_for("student")
        forward.image_layers, forward.text_layers = layers.get("image"), layers.get("text")
        teacher.set_intermediate_layers(loss_fn.feat_layers_for("teacher"), member=distill.kd_teacher_member or 0)
    return forward


def prepare_teacher(teacher, loss_fn, config: Config, device: torch.device) -> None:
    """The live frozen teacher made cheap once at start-up (models/teacher.py): only the towers the active terms
    read, weights in the low precision of --precision, optionally compiled. Under --fsdp-shard-teacher the weights
    stay fp32 (FSDP2's mixed-precision policy casts the gathered blocks)."""
    if not isinstance(teacher, Teacher):
        if config.teacher.teacher_compile:
            raise UsageError("--teacher-compile compiles the live teacher: with --teacher-cache or "
                             "--datacompdr-teachers none is run")
        return
    teacher.set_outputs(loss_fn.teacher_towers)
    sharded = config.parallel.fsdp_shard_teacher
    if sharded and config.teacher.teacher_compile:
        raise UsageError("--teacher-compile cannot compile a sharded teacher: drop it or --fsdp-shard-teacher")
    dtype = None if sharded else teacher_dtype(config.runtime.precision, device)
    teacher.prepare(dtype, compile=config.teacher.teacher_compile)
    logging.info("teacher: towers %s, weights %s%s", "+".join(teacher.runs_towers) or "none",
                 str(dtype or torch.float32).replace("torch.", ""), ", compiled" if config.teacher.teacher_compile else "")


def check_teacher_biases(loss_fn, teacher) -> None:
    """A sigmoid KD term needs each teacher member's logit bias: a SigLIP teacher's own, or --teacher-logit-biases;
    a CLIP teacher has none, and a bias is never guessed."""
    if not loss_fn.needs_teacher_bias or loss_fn.teacher_logit_biases is not None:
        return
    missing = [name for name, b in zip(getattr(teacher, "names", None) or range(len(teacher.logit_biases)),
                                       teacher.logit_biases) if b is None]
    if missing:
        raise UsageError(f"the sigmoid KD term needs the teacher's logit bias, and teacher member(s) "
                         f"{', '.join(map(str, missing))} have none (a CLIP teacher): pass --teacher-logit-biases "
                         "(one per --teacher member), or use a SigLIP teacher")


class Trainer:
    def __init__(self, config: Config, env: distributed.DistEnv):
        self.config, self.env = config, env
        # a bad eval path fails now, not after the first epoch
        self.evaluator = TrainingEvaluator(config.eval, config.data, config.runtime, config.optim.epochs)
        seed_everything(config.seed)  # same seed on every rank: identical student init and loss-side heads
        self.precision = resolve(config.runtime.precision, env.device, config.runtime.amp_fp16_on_cpu)
        engine_name = config.parallel.engine
        # --precision bf16: FSDP2 and DeepSpeed cast the weights themselves (fp32 master weights); DDP and Horovod
        # train open_clip's bf16 model, as open_clip does
        self.kind = student_kind(config.model.student_kind)  # clip | image | classifier (student_kinds.py)
        self.student_bundle, self.teacher, self.teacher_bundle, cache = self.kind.open_models(
            config, env.device, "bf16" if self.precision.low_precision_weights and engine_name in ("ddp", "horovod")
            else None)
        self.student = self.student_bundle.model  # the bare student (what evaluation and export see)
        if config.eval.t_eval and self.teacher_bundle is None:
            raise UsageError("--t-eval evaluates the live teacher: not with --teacher-cache")
        if config.model.init_from_teacher:  # weight inheritance: an init, so a --resume checkpoint overwrites it
            init_student_from_teacher(self.student, self.teacher, config.model, config.teacher)
        self.loss_fn = self.kind.create_loss(config, self.student, self.teacher).to(env.device)
        if self.loss_fn.needs_teacher and self.teacher is None:
            raise UsageError("the --distill spec has teacher terms but no --teacher was given")
        self.kind.prepare(self)  # image-only students: the class heads, from the teacher, once (before wrapping)
        self.loss_fn.sync_()
        logging.info("distillation: %s", self.loss_fn.describe())

        forward = self.kind.forward_module(self.student, self.loss_fn, self.teacher, config, env.device)
        prepare_teacher(self.teacher, self.loss_fn, config, env.device)
        self.scaler = make_grad_scaler(self.precision, sharded=engine_name == "fsdp")
        optim = config.optim
        self.engine = parallel.create_engine(  # DDP, FSDP2, DeepSpeed or Horovod; the optimizer is built after wrapping
            config.parallel, env, model=forward, loss_fn=self.loss_fn, teacher=self.teacher,
            make_groups=lambda: param_groups(self.student, self.loss_fn, optim.wd),
            make_optimizer=lambda groups: create_optimizer(groups, optim), scaler=self.scaler,
            precision=self.precision, batch_size=config.data.batch_size, accum_freq=optim.accum_freq,
            grad_clip_norm=optim.grad_clip_norm, torchcompile=config.model.torchcompile)
        logging.info("student engine: %s", self.engine.describe())
        self.model, self.optimizer = self.engine.model, self.engine.optimizer

        decode = config.data.decode_device
        transforms = build_transforms(self.student_bundle, self.teacher_bundle, config.seed, cache,
                                      encoded=decode != "workers")
        self.decoder = None if decode == "workers" else BatchDecoder(  # --decode-device cpu|cuda
            self.student_bundle.image_format, self.teacher_bundle.image_format if self.teacher_bundle else None,
            env.device if decode == "cuda" else torch.device("cpu"))
        if self.decoder is not None:
            logging.info("training images are decoded and cropped in the trainer on %s; the loader workers only "
                         "read the files", self.decoder.device)
        data = get_data(config.data, transforms, seed=config.seed, image_size=self.student_bundle.image_format.size
                        )["train"]
        self.data = group_micro_batches(data, optim.accum_freq)  # --accum-freq K: K micro-batches per step
        self.schedule = LRSchedule.from_config(self.optimizer, optim, self.data.num_batches)
        run_dir, report_to = config.logging.run_dir, config.logging.report_to
        tensorboard = os.path.join(run_dir, "tensorboard") if run_dir and "tensorboard" in report_to else None
        wandb = WandbRun(config.logging.wandb_project_name, config.logging.name, config.logging.wandb_notes,
                         config.flat(), run_dir) if "wandb" in report_to else None
        self.metrics = MetricLogger(tensorboard, enabled=env.is_master, wandb=wandb)
        self.remote = RemoteSync(config.logging, run_dir, enabled=env.is_master)
        self.state = TrainState(is_master=env.is_master)
        self.checkpointer = CheckpointManager(
            config.checkpoint, os.path.join(run_dir, "checkpoints") if run_dir else None, env, engine=self.engine,
            loss=self.loss_fn, scaler=self.scaler, train=self.state, data=self.data, record=config.flat(),
            num_batches=self.data.num_batches, epochs=optim.epochs)
        self.stop = StopRequest(os.path.join(run_dir, STOP_FILE) if run_dir else None, env.device, env.is_master)
        # Identical weights everywhere are built; from here on each rank draws its own randomness (dropout,
        # drop-path), as open_clip does. Patch masks and augmentation have their own seeds (process-count free).
        seed_everything(config.seed + env.rank)

    # ---- where the run is ----------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.state.batch_in_epoch

    def state_dict(self) -> dict:
        """The checkpoint's content (collective under FSDP2/DeepSpeed: every rank calls it, rank 0 saves)."""
        return self.checkpointer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.checkpointer.load_state_dict(state)

    # ---- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Resume (--resume), then train to the end, --max-steps or a stop request; checkpoints as configured.
        CLIP-KD's --eval: evaluate once and return; --t-eval: evaluate the teacher first."""
        if self.config.eval.eval:
            self.evaluate_only()
            self.metrics.close()
            return
        self.checkpointer.resume()
        if self.config.eval.t_eval:
            self.evaluate_teacher()
        self.stop.install()
        try:
            self.run(self.config.optim.max_steps)
        finally:
            self.stop.uninstall()
        if self.stop.agreed_reason:
            logging.info("stopped at step %d (%s): checkpoint written, continue with --resume latest --name %s",
                         self.step, self.stop.agreed_reason, self.config.logging.name)
        self.metrics.close()
        self.remote.sync()

    def evaluate_only(self) -> None:
        """--eval: the student's weights from --resume PATH (any checkpoint format: ours, CLIP-KD's, open_clip's),
        else those it was built with, on every evaluation set."""
        from .models import load_weights

        if self.config.checkpoint.resume:
            load_weights(self.student, self.config.checkpoint.resume)
            logging.info("--eval: student weights from %s", self.config.checkpoint.resume)
        self.evaluate(self.state.epoch, force=True)

    def evaluate_teacher(self) -> None:
        """--t-eval: the (first) teacher on every evaluation set, in its own input format."""
        teacher, bundle = self.teacher.members[0], self.teacher_bundle
        results = self.evaluator(teacher, EvalTransform(bundle.image_format), bundle.tokenizer, self.state.epoch,
                                 self.env.device, force=True)
        if results:
            self.metrics.log(self.state.step, results, prefix="teacher_eval")

    def run(self, max_steps: int | None = None) -> None:
        """Steps from the current position until the last epoch ends, `max_steps` is reached or a stop request."""
        state = self.state
        self.model.train()
        window, end = Counter(), time.perf_counter()
        total = self.data.num_batches * self.config.optim.epochs
        progress = TrainProgress(min(total, max_steps) if max_steps else total, state.step,
                                 self.config.data.batch_size * self.config.optim.accum_freq * self.env.world_size,
                                 enabled=self.env.is_master)
        try:
            self._run(max_steps, progress, window, end)
        except BaseException:
            progress.close(failed=True)
            raise
        progress.close()

    def _run(self, max_steps, progress: TrainProgress, window: Counter, end: float) -> None:
        state = self.state
        for batch in self.batches():  # a batch, or with --accum-freq K a list of K micro-batches
            window["data_time"] += time.perf_counter() - end
            losses = self.train_step(batch)
            progress.step(losses, state.epoch)
            window["batch_time"] += time.perf_counter() - end
            window["n"] += 1
            end = time.perf_counter()
            epoch_done = state.batch_in_epoch == self.data.num_batches
            if losses is not None and (state.step % self.config.logging.log_every_n_steps == 0 or epoch_done):
                self.log_step(losses, window, batch)
                window = Counter()
            preempted = self.stop.should_stop()  # collective: every rank, every step
            finished = max_steps is not None and state.step >= max_steps
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            filename = self.checkpointer.due(step=state.step, epoch=state.epoch, epoch_done=epoch_done,
                                             finished=finished, preempted=preempted)
            if filename:
                self.checkpointer.save(filename)
                self.remote.maybe_sync()
            if epoch_done and not preempted:  # a preempted job has minutes left: no evaluation
                self.evaluate(state.epoch)
            if finished or preempted:
                return

    def batches(self):
        """The batches from the current position to the end of the last epoch."""
        state, data = self.state, self.data
        while state.epoch < self.config.optim.epochs:
            if state.batch_in_epoch >= data.num_batches:  # resumed from the end of an epoch
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            data.set_epoch(state.epoch, state.batch_in_epoch)
            yield from data.dataloader

    def train_step(self, batch) -> dict[str, torch.Tensor] | None:
        """One optimizer step; None when it was skipped for a non-finite loss."""
        micro = batch if isinstance(batch, list) else [batch]
        if self.decoder is not None:
            micro = [self.decoder(b) for b in micro]
        self.schedule(self.state.step)
        for b in micro:
            self.state.skipped.update(b.get("skipped", {}))
        losses = accumulated_step(self, micro) if len(micro) > 1 else train_step(self, micro[0])
        self.state.batch_in_epoch += 1
        if losses is not None:
            self.state.step += 1
        return losses

    def evaluate(self, epoch: int, force: bool = False) -> None:
        if not force and not self.evaluator.due(epoch):
            return
        with self.engine.unsharded():  # FSDP2/ZeRO-3: the bare student's weights gathered for evaluation
            results = self.evaluator(self.student, EvalTransform(self.student_bundle.image_format),
                                     self.student_bundle.tokenizer, epoch, self.env.device, force=force)
        if results:
            self.metrics.log(self.state.step, results, prefix="eval")

    def log_step(self, losses: dict, window: Counter, batch) -> None:
        state = self.state
        micro = batch if isinstance(batch, list) else [batch]
        metrics: dict[str, float] = {name: float(v.detach()) for name, v in losses.items()}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch"] = state.epoch + state.batch_in_epoch / max(1, self.data.num_batches)
        metrics["student_scale"] = float(self.student.logit_scale.detach().exp())
        for name, weight in self.loss_fn.effective_weights(state.step).items():
            metrics[f"weight/{name}"] = float(weight)
        n = max(1, window["n"])
        samples = sum(len(b["key"]) for b in micro) * self.env.world_size
        metrics["samples_per_s"] = samples * n / max(window["batch_time"], 1e-9)
        metrics["data_time"] = window["data_time"] / n
        metrics["batch_time"] = window["batch_time"] / n
        # Bad samples are counted, never fatal: totals summed over ranks (every rank takes part in the gather).
        for name, count in sorted(distributed.sum_counters(state.skipped).items()):
            metrics[f"skipped/{name}"] = float(count)
        metrics["nonfinite_skipped_steps"] = float(state.nonfinite_total)
        self.metrics.log(state.step, metrics)
