"""The typed configuration of a run: one dataclass per concern, built once from the parsed flags.

Field names are the flags' argparse dests (`--lock-image-unlocked-groups` -> `model.lock_image_unlocked_groups`),
so a value is found by its flag and a checkpoint's flat record (`Config.flat`) keeps the keys it always had. Each
component takes only the section(s) it needs. This is the only module that reads the flags' namespace; the CLI
layer (`params.py`, and the parsers of `cache_teacher` and `eval`) declares the flags and validates them.

A CLI that declares only some sections' flags (the cache builder, the evaluator) gets the defaults below for the
rest, which its code never reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .errors import UsageError

Section = TypeVar("Section")

CLIPKD_ALIASES = {"alpha_ckd_loss": "crd", "alpha_icl_loss": "icl", "alpha_fd_loss": "fd",
                  "alpha_gd_loss": "gd", "alpha_afd_loss": "afd", "alpha_cross_kd_loss": "xkd"}


def comma_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@dataclass(frozen=True)
class ModelConfig:
    """The student: architecture, initial weights, and what of it trains."""

    model: str = "ViT-T-16"
    pretrained: str = ""
    force_image_size: int | None = None
    grad_checkpointing: bool = False
    torchcompile: bool = False
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    init_from_teacher: bool = False  # weight inheritance (TinyCLIP, DistillCLIP): models/inherit.py
    inherit_layers: str | None = None  # layer spec for both towers (None: auto)
    inherit_image_layers: str | None = None  # per-tower overrides of inherit_layers
    inherit_text_layers: str | None = None
    # open_clip's create_model options (--force-patch-dropout: FLIP)
    force_patch_dropout: float | None = None
    force_quick_gelu: bool = False
    force_custom_text: bool = False
    pretrained_image: bool = False
    cache_dir: str | None = None
    student_kind: str = "clip"  # clip | image | classifier (training/student_kinds.py)


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher (one model or an ensemble), run live or read from a teacher cache."""

    teacher: str | None = None
    teacher_pretrained: str | None = None
    teacher_compile: bool = False
    teacher_cache: str | None = None
    cache_missing: str = "error"
    cache_views: str = "auto"
    cache_verify: str = "checksum"

    @property
    def models(self) -> list[str]:
        return comma_list(self.teacher)

    @property
    def weights(self) -> list[str]:
        """One weight source per model ('' = the architecture's random init)."""
        return comma_list(self.teacher_pretrained) or [""] * len(self.models)


@dataclass(frozen=True)
class DistillConfig:
    """The loss spec (docs/losses.md) and the options of its terms."""

    distill: str | None = None
    recipe: str | None = None
    alpha_ckd_loss: float | None = None
    alpha_icl_loss: float | None = None
    alpha_fd_loss: float | None = None
    alpha_gd_loss: float | None = None
    alpha_afd_loss: float | None = None
    alpha_cross_kd_loss: float | None = None
    siglip: bool = False  # open_clip's --siglip: the spec's task term was rewritten to task_siglip (compat.py)
    kd_temperature: float = 1.0
    teacher_logit_scale: float | None = None
    teacher_logit_scales: str | None = None  # "70,60": one scale per ensemble member
    teacher_logit_biases: str | None = None  # "-10,-12": one sigmoid bias per member (sig_kd)
    sigmoid_chunk: int = 1024  # rows per chunk of the sigmoid terms' pair matrix
    student_kd_logit_scale: float | None = None
    mask_ratio: float = 0.5
    feat_layers: str | None = None
    emb_metric: str = "mse"
    kd_teacher_member: int | None = None
    kd_auto_balance: str = "none"
    kd_compat: str = "none"
    local_loss: bool = False
    gather_with_grad: bool = False
    teacher_head: str = "text"  # classifier students: the teacher's class logits (distill/classifier.py)
    classifier_kd_weight: float = 1.0
    classifier_ce_weight: float = 0.0

    @property
    def overrides(self) -> dict[str, float]:
        """CLIP-KD's alpha_* flags as {term: weight}, merged over the recipe or --distill spec."""
        values = dataclasses.asdict(self)
        return {term: values[flag] for flag, term in CLIPKD_ALIASES.items() if values[flag] is not None}


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are batched (per process)."""

    train_data: str | None = None
    val_data: str | None = None
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    data_root: str | None = None
    train_num_samples: int | None = None
    val_num_samples: int | None = None
    synthetic_num_samples: int = 1024
    batch_size: int = 64
    workers: int = 2
    decode_device: str = "workers"  # workers (PIL, in the loader workers) | cpu | cuda (batched, in the trainer)
    dataset_resampled: bool = False
    train_data_upsampling_factors: str | None = None
    wds_caption_key: str = "txt"
    captions_per_step: int = 1  # 2: MobileCLIP's two-caption loss (docs/losses_impl.md)
    datacompdr_teachers: str | None = None  # "768,768": shards in DataCompDR's layout, their teachers' widths
    wds_key_format: str = "auto"
    wds_shuffle_buffer: int = 5000
    val_data_root: str | None = None  # root of --val-data's relative image paths (default: the first data_root)
    val_dataset_type: str = "auto"


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (AdamW unless --opt), its schedule, and the length of training."""

    epochs: int = 32
    lr: float = 5e-4
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 10000
    lr_scheduler: str = "cosine"
    grad_clip_norm: float | None = None
    max_nonfinite_steps: int = 20
    max_steps: int | None = None
    accum_freq: int = 1
    opt: str = "adamw"
    momentum: float | None = None
    skip_scheduler: bool = False
    epochs_cooldown: int | None = None
    lr_cooldown_end: float = 0.0
    lr_cooldown_power: float = 1.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in which number format a process computes; shared by every entry point."""

    device: str = "auto"
    dist_backend: str | None = None
    dist_url: str = "env://"
    precision: str | None = "amp"
    amp_fp16_on_cpu: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ParallelConfig:
    """How the student is spread over processes (DDP when none is chosen)."""

    fsdp: bool = False
    fsdp_shard_teacher: bool = False
    deepspeed: str | None = None
    horovod: bool = False
    use_bn_sync: bool = False
    ddp_static_graph: bool = False

    @property
    def engine(self) -> str:
        chosen = [name for name, on in (("fsdp", self.fsdp), ("deepspeed", bool(self.deepspeed)),
                                        ("horovod", self.horovod)) if on]
        if len(chosen) > 1:
            raise UsageError(f"choose one of --fsdp, --deepspeed, --horovod (got "
                             f"{', '.join('--' + c for c in chosen)})")
        return chosen[0] if chosen else "ddp"


@dataclass(frozen=True)
class CheckpointConfig:
    save_frequency: int = 1
    save_every_n_steps: int | None = None
    keep_last_k: int | None = None  # --delete-previous-checkpoint is keep_last_k 1 (compat.normalize)
    resume: str | None = None
    save_most_recent: bool = False
    delete_previous_checkpoint: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (zero-shot, retrieval on --val-data, the --eval-datasets suite)."""

    zeroshot_frequency: int = 1
    val_frequency: int = 1
    zeroshot_data: str | None = None
    eval_datasets: str | None = None
    eval_frequency: int = 1
    imagenet_val: str | None = None  # open_clip / CLIP-KD: zero-shot every zeroshot_frequency epochs
    imagenet_v2: str | None = None
    imagenet_r: str | None = None
    imagenet_a: str | None = None
    imagenet_sketch: str | None = None
    eval: bool = False  # CLIP-KD's --eval: evaluate once, no training
    t_eval: bool = False  # CLIP-KD's --t-eval: evaluate the teacher before training

    @property
    def imagenet_sets(self) -> list[tuple[str, str, str]]:
        """(name, kind, path) of the --imagenet-* sets given."""
        return [(name, kind, path) for name, kind, path in (
            ("imagenet-val", "imagenet1k", self.imagenet_val), ("imagenet-v2", "imagenetv2", self.imagenet_v2),
            ("imagenet-r", "imagenet-r", self.imagenet_r), ("imagenet-a", "imagenet-a", self.imagenet_a),
            ("imagenet-sketch", "imagenet-sketch", self.imagenet_sketch)) if path]


@dataclass(frozen=True)
class LoggingConfig:
    logs: str = "./logs"
    name: str | None = None
    report_to: str = ""
    log_every_n_steps: int = 100
    tag: str | None = None  # CLIP-KD: part of the default run name
    wandb_project_name: str = "open-clip"
    wandb_notes: str = ""
    remote_sync: str | None = None
    remote_sync_frequency: int = 300
    remote_sync_protocol: str = "s3"

    @property
    def run_dir(self) -> str | None:
        return os.path.join(self.logs, self.name) if self.logs and self.name else None


def section_from(cls: type[Section], values: dict[str, Any]) -> Section:
    """A section from a flat {dest: value} record; fields the record lacks keep their defaults."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def flat(*sections) -> dict[str, Any]:
    """The sections' fields as one {dest: value} record (what checkpoints store and resume compares)."""
    out: dict[str, Any] = {}
    for section in sections:
        out.update(dataclasses.asdict(section))
    return out


@dataclass(frozen=True)
class Config:
    """A training run's configuration (`python -m training.main`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict) -> Config:
        values = args if isinstance(args, dict) else vars(args)
        return cls(**{name: section_from(section, values) for name, section in _SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        return flat(*(getattr(self, f.name) for f in fields(self)))

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)

    @property
    def seed(self) -> int:
        return self.runtime.seed

    def default_run_name(self) -> str:
        """--name, else a timestamp and the models (as open_clip_train names its runs)."""
        if self.logging.name:
            return self.logging.name
        teacher = "-".join(os.path.splitext(os.path.basename(t))[0] for t in self.teacher.models) or "none"
        model = os.path.splitext(os.path.basename(self.model.model))[0]
        tag = f"-tag_{self.logging.tag}" if self.logging.tag else ""
        return (f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-model_{model}-teacher_{teacher}-lr_{self.optim.lr:g}"
                f"-b_{self.data.batch_size}{tag}")

    def with_run_name(self, name: str) -> Config:
        return self.replace(logging=dataclasses.replace(self.logging, name=name))


_SECTIONS = {"model": ModelConfig, "teacher": TeacherConfig, "distill": DistillConfig, "data": DataConfig,
             "optim": OptimConfig, "runtime": RuntimeConfig, "parallel": ParallelConfig,
             "checkpoint": CheckpointConfig, "eval": EvalConfig, "logging": LoggingConfig}
