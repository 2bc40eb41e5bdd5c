"""What the trainer does differently per `--student-kind`: a registry of `StudentKind`s, one per name.

    clip        a two-tower open_clip student, image–caption data, the --distill loss zoo (the default)
    image       an image-only student (models/image_student.py) regressing the teacher's image embedding (emb), on
                data with or without captions; a zero-shot class head from the teacher's text tower is set before
                training and saved with the student
    classifier  a classifier (num_classes = the class folder's classes) learning the teacher's class logits (KL at
                --kd-temperature, optional label cross-entropy) from a zero-shot (text) or linear teacher head

Each kind decides how the models are built (`open_models`), which loss runs (`create_loss`), the module the engine
wraps (`forward_module`), what the loss is given (`loss_inputs`), and what is set once the run is built
(`prepare`: the class heads). The optimizer step (train.py) reads the same top to bottom for every kind.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .data.transforms import EvalTransform
from .errors import UsageError

KIND_NAMES = ("clip", "image", "classifier")
IMAGE_TERMS = ("emb",)  # the terms an image-only student can train on (it has no text tower)


@dataclass(frozen=True)
class StudentKind:
    name: str
    open_models: Callable  # (config, device, low_precision) -> (student bundle, teacher, teacher bundle, cache)
    create_loss: Callable  # (config, student, teacher) -> loss module
    forward_module: Callable  # (student, loss_fn, teacher, config, device) -> the module the engine wraps
    loss_inputs: Callable  # (student outputs, teacher outputs, batch, step, device) -> loss keyword arguments
    prepare: Callable  # (trainer) -> None, once the run is built (class heads)
    two_tower: bool = True  # captions are tokenised for the student


# ---- clip: the two-tower student (the trainer's own functions) --------------------------------------------------

def _clip_models(config: Config, device, low_precision):
    from .models import create_student
    from .trainer import open_teacher

    bundle = create_student(config.model, device, low_precision=low_precision)
    teacher, teacher_bundle, cache = open_teacher(config, device)
    return bundle, teacher, teacher_bundle, cache


def _clip_loss(config: Config, student, teacher):
    from .distill import create_distill_loss
    from .models import Teacher, embed_dim

    teacher_dims = teacher.embed_dims if teacher is not None else []
    from .trainer import check_teacher_biases

    members = list(teacher.members) if isinstance(teacher, Teacher) else None  # feat: live towers
    loss_fn = create_distill_loss(config.distill, embed_dim(student), teacher_dims, seed=config.seed,
                                  student_model=student, teacher_model=members)
    check_teacher_biases(loss_fn, teacher)
    return loss_fn


def _clip_forward(student, loss_fn, teacher, config: Config, device):
    from .trainer import student_forward_module

    return student_forward_module(student, loss_fn, teacher, config.distill, device)


def _clip_loss_inputs(student: dict, teacher: dict | None, batch: dict, step: int, device) -> dict:
    return dict(
        student_image=student["image_features"], student_text=student["text_features"],
        student_scale=student["logit_scale"],
        teacher_image=teacher["image_features"] if teacher else None,
        teacher_text=teacher["text_features"] if teacher else None,
        teacher_scale=teacher["logit_scales"] if teacher else None,
        student_bias=student.get("logit_bias"),
        teacher_bias=teacher.get("logit_biases") if teacher else None,
        step=step,
        student_intermediates={"image": student["image_intermediates"], "text": student["text_intermediates"]},
        teacher_intermediates=teacher.get("intermediates") if teacher else None)


# ---- image and classifier: image-only students ------------------------------------------------------------------

class ImageForward(nn.Module):
    """What the engine wraps for an image-only student: one image forward (the `text` argument is ignored).
    `clip` is the bare student, as for StudentModel (what checkpoints, evaluation and export see)."""

    mask_ratio = 0.0

    def __init__(self, student: nn.Module):
        super().__init__()
        self.clip = student

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None, mask_keys=None) -> dict:
        if self.clip.kind == "classifier":
            return {"logits": self.clip.classify(image)}
        return {"image_features": self.clip.encode_image(image)}


def _image_forward(student, loss_fn, teacher, config: Config, device):
    return ImageForward(student).to(device)


def _single_teacher_dim(config: Config, teacher) -> int:
    if teacher is None:
        raise UsageError(f"--student-kind {config.model.student_kind} needs a teacher: --teacher, or --teacher-cache")
    dims = teacher.embed_dims
    if len(dims) != 1:
        raise UsageError(f"--student-kind {config.model.student_kind} distils one teacher, got an ensemble of "
                         f"{len(dims)}")
    return int(dims[0])


def _image_only_models(config: Config, device, low_precision):
    """The teacher first (the student projects to its width), then the student from the same seed as always."""
    from .models.image_student import create_image_student
    from .trainer import open_teacher, seed_everything

    model = config.model
    if low_precision:
        raise UsageError("--precision bf16 (bf16 weights) is for clip students; use amp or amp_bf16")
    teacher, teacher_bundle, cache = open_teacher(config, device)
    out_dim = _single_teacher_dim(config, teacher)
    if model.student_kind == "classifier":
        out_dim = len(_train_classnames(config))
    seed_everything(config.seed)  # the student's init does not depend on what building the teacher drew
    student = create_image_student(model.model, model.student_kind, out_dim, pretrained=model.pretrained,
                                   force_image_size=model.force_image_size, device=device)
    if model.student_kind == "classifier":
        student.set_class_names(_train_classnames(config))
    from .models import ModelBundle

    return ModelBundle(student, student.image_format, None, 0), teacher, teacher_bundle, cache


def _image_loss(config: Config, student, teacher):
    from .distill import create_distill_loss, resolve_spec

    distill = config.distill
    if distill.distill is None and distill.recipe is None:
        distill = dataclasses.replace(distill, distill="emb=1")  # an image student's loss: embedding regression
    spec = resolve_spec(distill.distill, distill.recipe, distill.overrides)
    other = [t for t in spec.active if t not in IMAGE_TERMS]
    if other:
        raise UsageError(f"--student-kind image trains on {', '.join(IMAGE_TERMS)} only (it has no text tower); "
                         f"the spec has {', '.join(other)}")
    d_t = _single_teacher_dim(config, teacher)
    return create_distill_loss(distill, d_t, [d_t], seed=config.seed)  # the student projects to d_t itself


def _image_loss_inputs(student: dict, teacher: dict | None, batch: dict, step: int, device) -> dict:
    return dict(student_image=student["image_features"], student_text=None, student_scale=None,
                teacher_image=teacher["image_features"], teacher_text=None, teacher_scale=None, step=step)


def _classifier_loss(config: Config, student, teacher):
    from .distill.classifier import ClassifierDistillLoss

    distill = config.distill
    return ClassifierDistillLoss(student.num_classes, _single_teacher_dim(config, teacher), distill.teacher_head,
                                 distill.kd_temperature, distill.classifier_kd_weight, distill.classifier_ce_weight)


def _classifier_loss_inputs(student: dict, teacher: dict | None, batch: dict, step: int, device) -> dict:
    return dict(student_logits=student["logits"], teacher_image=teacher["image_features"][0] if teacher else None,
                labels=batch["label"].to(device, non_blocking=True), step=step)


# ---- the class heads, set once the run is built -----------------------------------------------------------------

def _train_classnames(config: Config) -> list[str]:
    """The classes of the labelled training folder (classifier students)."""
    if not _is_imagefolder(config):
        raise UsageError("--student-kind classifier reads class folders: --train-data FOLDER[,FOLDER] with "
                         "classnames.txt in the labelled one")
    names = _folder_classnames(config)
    if not names:
        raise UsageError("--student-kind classifier needs a labelled class folder (classnames.txt and one "
                         "sub-folder per class) among --train-data")
    return names


def _is_imagefolder(config: Config) -> bool:
    from .data import dataset_type

    return bool(config.data.train_data) and dataset_type(config.data) == "imagefolder"


def _folder_classnames(config: Config) -> list[str] | None:
    from .data.imagefolder import folder_classnames

    return folder_classnames(config.data.train_data.split(",")) if _is_imagefolder(config) else None


def head_teacher(trainer):
    """A live open_clip teacher for the class heads: the run's teacher, or under --teacher-cache the --teacher
    model (its text tower embeds the prompts); None when there is none."""
    from .models import Teacher, create_teacher

    if isinstance(trainer.teacher, Teacher):
        return trainer.teacher.members[0], trainer.teacher_bundle
    if trainer.config.teacher.models:
        teacher, bundle = create_teacher(trainer.config.teacher, trainer.env.device, None)
        return teacher.members[0], bundle
    return None, None


def class_prompts(trainer) -> tuple[list[str], list] | None:
    """(class names, templates): --zeroshot-data's set, else the labelled training folder's; None without either."""
    from .eval import templates as T

    if trainer.evaluator.zeroshot:
        ds = trainer.evaluator.zeroshot[1]
        return list(ds.classnames), list(ds.templates)
    names = _folder_classnames(trainer.config)
    if names:
        return list(names), _folder_templates(trainer.config) or list(T.OPENAI_IMAGENET_TEMPLATES)
    return None


def _folder_templates(config: Config) -> list | None:
    from .data.imagefolder import folder_templates

    return folder_templates(config.data.train_data.split(",")) if _is_imagefolder(config) else None


def _image_prepare(trainer) -> None:
    from .eval.zeroshot import build_classifier

    prompts = class_prompts(trainer)
    if prompts is None:
        logging.warning("image student: no class names (--zeroshot-data or a class folder in --train-data), so no "
                        "zero-shot head is saved with it")
        return
    model, bundle = head_teacher(trainer)
    if model is None:
        advice = ("training from --teacher-cache: pass --teacher and --teacher-pretrained to let its text tower embed "
                  "the class prompts")
        if trainer.evaluator.zeroshot:  # the zero-shot evaluation would fail after the first epoch
            raise UsageError(f"--zeroshot-data needs the image student's class head ({advice})")
        logging.warning("image student: no zero-shot head (%s)", advice)
        return
    names, templates = prompts
    head = build_classifier(model, bundle.tokenizer, names, templates, trainer.env.device)
    trainer.student.set_class_head(head, names, float(model.logit_scale.detach().exp()))
    logging.info("zero-shot head: %d classes x %d prompts embedded by the teacher's text tower, saved with the "
                 "student", len(names), len(templates))


def _classifier_prepare(trainer) -> None:
    from .eval.datasets import FileImages
    from .eval.engine import encode_images
    from .eval.linear_probe import fit_linear_head
    from .eval.templates import OPENAI_IMAGENET_TEMPLATES
    from .eval.zeroshot import build_classifier

    model, bundle = head_teacher(trainer)
    if model is None:
        raise UsageError("--student-kind classifier builds the teacher's class head with the teacher model: pass "
                         "--teacher and --teacher-pretrained (also with --teacher-cache)")
    names, device = trainer.student.classnames, trainer.env.device
    if trainer.loss_fn.teacher_head == "text":
        templates = _folder_templates(trainer.config) or list(OPENAI_IMAGENET_TEMPLATES)
        head = build_classifier(model, bundle.tokenizer, names, templates, device)
        trainer.loss_fn.set_teacher_head(float(model.logit_scale.detach().exp()) * head)
        logging.info("teacher head: zero-shot over %d classes x %d prompts", len(names), len(templates))
        return
    from .data.imagefolder import read_image_folders

    table = read_image_folders(trainer.config.data.train_data.split(","))
    labelled = [(p, y) for p, y in zip(table.images, table.labels) if y >= 0]
    source = FileImages([p for p, _ in labelled], [y for _, y in labelled])
    feats, labels = encode_images(model, source, EvalTransform(bundle.image_format), device,
                                  batch_size=trainer.config.data.batch_size)
    weight, bias, wd = fit_linear_head(feats, labels, len(names), seed=trainer.config.seed)
    trainer.loss_fn.set_teacher_head(weight, bias)
    logging.info("teacher head: linear probe fitted on the teacher's features of %d labelled images (wd %g)",
                 len(labelled), wd)


STUDENT_KINDS: dict[str, StudentKind] = {
    "clip": StudentKind("clip", _clip_models, _clip_loss, _clip_forward, _clip_loss_inputs, lambda trainer: None),
    "image": StudentKind("image", _image_only_models, _image_loss, _image_forward, _image_loss_inputs,
                         _image_prepare, two_tower=False),
    "classifier": StudentKind("classifier", _image_only_models, _classifier_loss, _image_forward,
                              _classifier_loss_inputs, _classifier_prepare, two_tower=False),
}


def student_kind(name: str) -> StudentKind:
    if name not in STUDENT_KINDS:
        raise UsageError(f"unknown --student-kind '{name}' ({', '.join(STUDENT_KINDS)})")
    return STUDENT_KINDS[name]
