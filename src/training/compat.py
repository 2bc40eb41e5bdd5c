"""Compatibility with the command lines of open_clip_train and CLIP-KD: one table says, for every flag either tool
has, what it is here.

- native: the same flag, same meaning (declared in params.py's group functions);
- alias: another spelling of one of our flags (the option string is declared next to ours in params.py);
- refused: declared here by `add_refused_flags`; giving it a value other than the tool's harmless default stops
  the run at start-up with one line that says why and what to use instead. Given its default it is accepted, since
  it then changes nothing (the rule for every refused flag: `harmless` below).

`normalize(args)` turns the flags whose meaning needs more than a spelling (`--delete-previous-checkpoint`, CLIP-KD's
`--mask_ratio` with `--alpha_fd_loss`, `--siglip`, `--force-image-size H W`, model-dependent Adam defaults) into our
fields, once, before the config is built. docs/compatibility.md is `python -m training.compat` (a test checks it).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import dataclass

from .errors import UsageError

log = logging.getLogger(__name__)

OPEN_CLIP, CLIP_KD, BOTH = ("open_clip",), ("CLIP-KD",), ("open_clip", "CLIP-KD")


@dataclass(frozen=True)
class Flag:
    flag: str  # as the other tool spells it
    tools: tuple[str, ...]
    status: str  # native | alias | refused
    ours: str | None = None  # native/alias: our flag it is (its dest is the config field)
    note: str = ""  # what it does here, or why it is refused and what to use instead
    harmless: object = None  # refused: the tool's default, accepted because it changes nothing
    nargs: int | str | None = None  # refused: 0 for on/off flags


def _native(flag, tools=BOTH, note=""):
    return Flag(flag, tools, "native", flag, note)


def _alias(flag, ours, tools, note=""):
    return Flag(flag, tools, "alias", ours, note)


def _refused(flag, tools, note, harmless=None, nargs=None):
    return Flag(flag, tools, "refused", None, note, harmless, nargs)


_SWITCH = 0  # nargs of an on/off flag

FLAGS: tuple[Flag, ...] = (
    # ---- data
    _native("--train-data"),
    _native("--train-data-upsampling-factors", OPEN_CLIP),
    _native("--val-data", note="a retrieval CSV or Karpathy JSON"),
    _native("--train-num-samples"), _native("--val-num-samples"),
    _native("--dataset-type", note="auto | csv | synthetic | webdataset | imagefolder; CLIP-KD's icar and vl_imagenet are refused "
                                   "(class-balanced ImageNet mixing is not part of this project)"),
    _native("--dataset-resampled"), _native("--csv-separator"), _native("--csv-img-key"), _native("--csv-caption-key"),
    _native("--data-root", CLIP_KD, "root of relative CSV image paths (comma list, one per --train-data CSV)"),
    _native("--val-data-root", CLIP_KD, "root of the --val-data CSV's relative image paths (default: the first "
                                        "--data-root)"),
    _native("--val-dataset-type", CLIP_KD, "csv or auto (the format of --val-data is detected: CSV or Karpathy "
                                           "JSON); webdataset, synthetic and icar are refused"),
    _refused("--num-per-class", CLIP_KD, "samples per class of CLIP-KD's icar/vl_imagenet data, which this project "
                                         "does not have", harmless=1),
    _refused("--sup-batch-size", CLIP_KD, "batch size of CLIP-KD's vl_imagenet supervised loader, which this project "
                                          "does not have; use --batch-size", harmless=64),
    _refused("--vl-batch-size", CLIP_KD, "batch size of CLIP-KD's vl_imagenet loader, which this project does not "
                                         "have; use --batch-size", harmless=64),
    # ---- evaluation
    _native("--imagenet-val", note="zero-shot ImageNet-1k (wnid folders) every --zeroshot-frequency epochs"),
    _native("--imagenet-v2", note="zero-shot ImageNetV2 every --zeroshot-frequency epochs"),
    _native("--imagenet-r", CLIP_KD, "zero-shot ImageNet-R (200 classes) every --zeroshot-frequency epochs"),
    _native("--imagenet-a", CLIP_KD, "zero-shot ImageNet-A (200 classes) every --zeroshot-frequency epochs"),
    _native("--imagenet-sketch", CLIP_KD, "zero-shot ImageNet-Sketch every --zeroshot-frequency epochs"),
    _native("--zeroshot-frequency", note="default 1 here (open_clip and CLIP-KD: 2)"),
    _native("--val-frequency"),
    _native("--eval", CLIP_KD, "evaluate the student (--resume/--pretrained weights) on every set once, no training"),
    _native("--t-eval", CLIP_KD, "evaluate the (first) teacher on every set before training"),
    # ---- logging
    _native("--logs", note="'' or none (open_clip's spelling) writes no run folder; under torchrun >= 2.6 spell it "
                           "--logs-dir"),
    _refused("--log-local", BOTH, "every node's local rank 0 writing its own out-N.log is not supported: rank 0 "
                                  "writes <logs>/<name>/out.log; drop the flag", nargs=_SWITCH),
    _native("--name"),
    _native("--tag", CLIP_KD, "appended to the default run name (tag_<TAG>), as CLIP-KD names its runs"),
    _native("--report-to", note="tensorboard, wandb, or both (comma list); wandb needs the optional extra "
                                "(pip install -e '.[wandb]')"),
    _native("--wandb-notes"), _native("--wandb-project-name", OPEN_CLIP),
    _native("--log-every-n-steps", OPEN_CLIP),
    _refused("--debug", BOTH, "open_clip's debug logging and wandb.watch are not wired; drop the flag (every loss "
                              "term, weight and scale is logged already)", nargs=_SWITCH),
    _refused("--copy-codebase", BOTH, "copying the source tree into the run folder is not supported: every "
                                      "checkpoint records the full flag set; use git to pin the code",
             nargs=_SWITCH),
    _native("--remote-sync", OPEN_CLIP, "copy <logs>/<name> to this fsspec URL every --remote-sync-frequency "
                                        "seconds (after a checkpoint) and at the end"),
    _native("--remote-sync-frequency", OPEN_CLIP),
    _native("--remote-sync-protocol", OPEN_CLIP, "both protocols copy through fsspec; s3 needs s3fs installed "
                                                 "(open_clip shells out to `aws s3 sync`)"),
    # ---- optimisation
    _native("--workers"), _native("--batch-size"), _native("--epochs"),
    _native("--epochs-cooldown", OPEN_CLIP, "with --lr-scheduler const-cooldown: the last N epochs decay to "
                                            "--lr-cooldown-end"),
    _native("--lr"),
    _native("--beta1", note="default by model as open_clip: 0.9"),
    _native("--beta2", note="default by model as open_clip: 0.98 for ViT students, else 0.999 (ViT told by "
                             "architecture, open_clip by 'vit' in the name)"),
    _native("--eps", note="default by model as open_clip: 1e-6 for ViT students, else 1e-8"),
    _native("--wd"),
    _native("--momentum", OPEN_CLIP, "momentum of a timm SGD-type --opt"),
    _native("--warmup"),
    _native("--opt", OPEN_CLIP, "adamw (default), or timm/NAME through timm.optim.create_optimizer_v2 over the same "
                                "no-weight-decay groups (timm/sgd: Nesterov SGD, timm/momentum: plain SGD)"),
    _native("--use-bn-sync", note="SyncBatchNorm in the student under DDP (BN students, CUDA)"),
    _native("--skip-scheduler", note="constant --lr, no warm-up"),
    _native("--lr-scheduler", OPEN_CLIP, "cosine | const | const-cooldown"),
    _native("--lr-cooldown-end", OPEN_CLIP), _native("--lr-cooldown-power", OPEN_CLIP),
    _native("--grad-clip-norm"), _native("--accum-freq", OPEN_CLIP, "GradCache: the losses of the whole K x batch"),
    # ---- checkpoints
    _native("--save-frequency"),
    _native("--save-most-recent", note="also writes checkpoints/epoch_latest.pt at every save"),
    _native("--delete-previous-checkpoint", OPEN_CLIP, "keep only the newest checkpoint (--keep-last-k 1)"),
    _native("--resume", note="'latest' or a path; with --eval, the weights to evaluate (any checkpoint format)"),
    # ---- model
    _native("--model", note="CLIP-KD's config names timm_resnet18, timm_mobilenetv3_small_100 and "
                            "timm-efficientnet-b0 are this project's timm-resnet18, timm-mobilenetv3_small_100, "
                            "timm-efficientnet_b0"),
    _native("--pretrained"),
    _alias("--model-checkpoint", "--pretrained", CLIP_KD, "student initial weights from a local file "
                                                          "({'state_dict'} and 'module.' prefixes load)"),
    _native("--pretrained-image", note="timm/ImageNet weights for the student image tower (open_clip's "
                                       "pretrained_image)"),
    _native("--cache-dir", OPEN_CLIP, "download folder of the student's and teacher's pretrained tags (open_clip's "
                                      "cache_dir)"),
    _native("--lock-image"), _native("--lock-image-unlocked-groups"), _native("--lock-image-freeze-bn-stats"),
    _native("--lock-text"), _native("--lock-text-unlocked-layers"), _native("--lock-text-freeze-layer-norm"),
    _refused("--image-mean", BOTH, "the mean/std are the model's own (each model's format is rendered from one "
                                   "augmented view); put image_mean in a JSON model config instead", nargs="+"),
    _refused("--image-std", BOTH, "the mean/std are the model's own; put image_std in a JSON model config instead",
             nargs="+"),
    _refused("--image-interpolation", OPEN_CLIP, "the interpolation is the model's own preprocess config; put "
                                                 "interpolation in a JSON model config instead"),
    _refused("--image-resize-mode", OPEN_CLIP, "the resize mode is the model's own preprocess config; put "
                                               "resize_mode in a JSON model config instead"),
    _refused("--aug-cfg", OPEN_CLIP, "open_clip's augmentation overrides are not wired into the shared "
                                     "teacher/student views; drop the flag", nargs="*"),
    _native("--grad-checkpointing"), _native("--local-loss"), _native("--gather-with-grad"),
    _refused("--force-context-length", OPEN_CLIP, "the tokenizers' context lengths are the models' own (teacher "
                                                  "and student each tokenise with theirs); set context_length in a "
                                                  "JSON model config instead"),
    _native("--force-image-size", OPEN_CLIP, "one size, or H W when equal"),
    _native("--force-quick-gelu"),
    _native("--force-patch-dropout", OPEN_CLIP, "FLIP patch dropout in the student ViT (training only)"),
    _native("--force-custom-text"),
    _refused("--torchscript", BOTH, "a TorchScript student cannot run the KD forward (patch masks, intermediate "
                                    "tokens) nor be wrapped by FSDP2/DeepSpeed; use --torchcompile", nargs=_SWITCH),
    _native("--torchcompile", OPEN_CLIP),
    _refused("--trace", BOTH, "torch.jit.trace freezes the model for inference only, so it cannot train; "
                              "evaluate with python -m training.eval", nargs=_SWITCH),
    _refused("--use-bnb-linear", OPEN_CLIP, "bitsandbytes int8 linear layers are not supported (bitsandbytes "
                                            "{bnb}); train in --precision amp or amp_bf16"),
    _native("--siglip", OPEN_CLIP, "the task term of the loss spec becomes task_siglip (sigmoid loss)"),
    _refused("--loss-dist-impl", OPEN_CLIP, "SigLIP's distributed exchange variants are not wired: every term "
                                            "all-gathers features (--local-loss, --gather-with-grad)"),
    _refused("--coca-caption-loss-weight", OPEN_CLIP, "CoCa captioning loss: CoCa models are not supported as "
                                                      "students", harmless=2.0),
    _refused("--coca-contrastive-loss-weight", OPEN_CLIP, "CoCa models are not supported as students; the "
                                                          "contrastive weight is the task term's in --distill",
             harmless=1.0),
    # ---- teacher and distillation
    _alias("--distill-model", "--teacher", OPEN_CLIP, "open_clip's distillation teacher"),
    _alias("--distill-pretrained", "--teacher-pretrained", OPEN_CLIP),
    _alias("--t-model", "--teacher", CLIP_KD), _alias("--t-model-checkpoint", "--teacher-pretrained", CLIP_KD),
    _native("--alpha_ckd_loss", CLIP_KD, "weight of crd"),
    _native("--alpha_icl_loss", CLIP_KD, "weight of icl"),
    _native("--alpha_cross_kd_loss", CLIP_KD, "weight of xkd (CLIP-KD's cross KD)"),
    _native("--alpha_fd_loss", CLIP_KD, "weight of fd; of mfd when --mask_ratio > 0 is given"),
    _native("--alpha_gd_loss", CLIP_KD, "weight of gd"),
    _native("--alpha_afd_loss", CLIP_KD, "weight of afd"),
    _alias("--mask_ratio", "--mask-ratio", CLIP_KD, "with --alpha_fd_loss, the fd weight goes to mfd (CLIP-KD's MFD)"),
    # ---- runtime and parallelism
    _native("--precision", note="fp32 | amp | amp_bf16 (amp_bfloat16) | bf16; fp16, pure_fp16 and pure_bf16 are "
                                "refused (training/precision.py)"),
    _native("--device", OPEN_CLIP, "auto | cpu | cuda | cuda:N"),
    _native("--dist-url"), _native("--dist-backend"),
    _native("--horovod", note="the horovod engine (training/parallel/horovod.py)"),
    _native("--ddp-static-graph", note="DistributedDataParallel(static_graph=True)"),
    _refused("--no-set-device-rank", BOTH, "each process always uses cuda:<local rank>; to restrict a process to "
                                           "one GPU, use CUDA_VISIBLE_DEVICES with --device cuda:0", nargs=_SWITCH),
    _native("--seed"),
)

BY_FLAG = {f.flag: f for f in FLAGS}



def _bnb_state() -> str:
    return "is installed" if importlib.util.find_spec("bitsandbytes") else "is not installed"


def _same_value(text, harmless) -> bool:
    try:
        return type(harmless)(text) == harmless
    except (TypeError, ValueError):
        return False


class Refuse(argparse.Action):
    """A foreign flag this project does not honour: one UsageError line, unless given its harmless default."""

    def __init__(self, option_strings, dest, reason: str = "", harmless=None, **kwargs):
        self.reason, self.harmless = reason, harmless
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.harmless is not None and _same_value(values, self.harmless):
            return
        reason = self.reason.replace("{bnb}", _bnb_state())
        raise UsageError(f"{option_string} is not supported here: {reason}")


def add_refused_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refused", "open_clip / CLIP-KD flags this project refuses (docs/compatibility.md)")
    for f in FLAGS:
        if f.status != "refused":
            continue
        # values stay text: no range, no type error
        extra = {"nargs": f.nargs} if f.nargs is not None else {"metavar": "VALUE"}
        if f.nargs not in (None, _SWITCH):
            extra["metavar"] = "VALUE"
        g.add_argument(f.flag, action=Refuse, reason=f.note, harmless=f.harmless, dest=argparse.SUPPRESS,
                       default=argparse.SUPPRESS, help=f"refused: {f.note.replace('{bnb}', _bnb_state())}".replace("%", "%%"), **extra)


# ---- value types of the native flags whose choices differ from open_clip's ----------------------------------------
PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16")
PRECISION_SPELLINGS = {"amp_bfloat16": "amp_bf16"}
REFUSED_PRECISIONS = {
    "fp16": "fp16 weights without loss scaling diverge; use amp (fp16 autocast + GradScaler) or amp_bf16",
    "pure_fp16": "fp16 weights without loss scaling diverge; use amp (fp16 autocast + GradScaler) or amp_bf16",
    "pure_bf16": "use bf16 (open_clip's bf16 weights with fp32 LayerNorms)",
}


def precision(value: str) -> str:
    value = PRECISION_SPELLINGS.get(value, value)
    if value in REFUSED_PRECISIONS:
        raise argparse.ArgumentTypeError(f"{value!r} is not supported: {REFUSED_PRECISIONS[value]}")
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


DATASET_TYPES = ("auto", "csv", "synthetic", "webdataset", "imagefolder")
REFUSED_DATASET_TYPES = ("icar", "vl_imagenet")


def dataset_type(value: str) -> str:
    if value in REFUSED_DATASET_TYPES:
        raise argparse.ArgumentTypeError(f"CLIP-KD's {value!r} (class-balanced ImageNet mixing) is not supported; "
                                         f"use csv or webdataset image-text data")
    if value not in DATASET_TYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASET_TYPES)}, got {value!r}")
    return value


def val_dataset_type(value: str) -> str:
    if value not in ("auto", "csv"):
        raise argparse.ArgumentTypeError(f"{value!r} is not supported: --val-data is a CSV or a Karpathy JSON "
                                         "(detected); use csv or auto, or --eval-datasets for other sets")
    return value


# ---- what a flag means beyond its spelling ------------------------------------------------------------------------
def default_adam_params(model: str) -> dict[str, float]:
    """open_clip_train's get_default_params: the Adam betas/eps a flag left unset takes, 0.98/1e-6 for a ViT
    student and 0.999/1e-8 otherwise. open_clip tells a ViT by 'vit' in the model's name; here by its architecture
    where its config is known (so `tiny-student`, a ViT, is one), else by the name as open_clip does."""
    if is_vit_student(model):
        return {"beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def is_vit_student(model: str) -> bool:
    import open_clip

    config = open_clip.get_model_config(model) if model else None
    if not config:
        return "vit" in model.lower()
    vision = config.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "vit" in vision["timm_model_name"].lower()
    return not isinstance(vision.get("layers"), (list, tuple))  # a list of stage depths: ModifiedResNet


def _square_size(value) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if len(value) == 1 or (len(value) == 2 and value[0] == value[1]):
        return int(value[0])
    raise UsageError(f"--force-image-size {' '.join(map(str, value))}: only square sizes are supported (the "
                     "students' patch masks and the teacher views assume square images)")


def siglip_spec(distill: str | None, recipe: str | None, overrides: dict[str, float]) -> str:
    """The resolved loss spec with its task term replaced by task_siglip (--siglip)."""
    from .distill.spec import TERMS, format_spec, resolve_spec

    if "task_siglip" not in TERMS:
        raise UsageError("--siglip needs the task_siglip loss term, which this build does not have: drop --siglip")
    resolved = resolve_spec(distill, recipe, overrides)
    if "task_siglip" in resolved.terms and "task" not in resolved.terms:
        return format_spec(resolved.terms)  # already rewritten
    if "task" not in resolved.terms:
        raise UsageError(f"--siglip replaces the task term, and the loss spec '{format_spec(resolved.terms)}' has "
                         "none: add task=W to --distill")
    if resolved.options:
        raise UsageError(f"--siglip with {resolved.source}: that recipe also sets options; give the terms with "
                         "--distill instead")
    terms = {("task_siglip" if name == "task" else name): w for name, w in resolved.terms.items()}
    return format_spec(terms)


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Give the foreign flags whose meaning is more than a spelling their fields (in place; idempotent)."""
    values = vars(args)
    if isinstance(values.get("logs"), str) and values["logs"].lower() == "none":
        args.logs = ""  # open_clip_train: --logs none stores no logs or checkpoints
    if "force_image_size" in values:
        args.force_image_size = _square_size(args.force_image_size)
    if "beta2" in values:
        for name, value in default_adam_params(values.get("model") or "").items():
            if values.get(name) is None:
                setattr(args, name, value)
    if values.get("delete_previous_checkpoint"):
        if values.get("keep_last_k") not in (None, 1):
            raise UsageError(f"--delete-previous-checkpoint keeps one checkpoint, --keep-last-k "
                             f"{args.keep_last_k} keeps {args.keep_last_k}: give one of them")
        args.keep_last_k = 1
    if values.get("clipkd_mask_ratio") and values.get("alpha_fd_loss") is not None:
        # CLIP-KD's MFD script: --alpha_fd_loss W --mask_ratio R is fd on the masked student image, our mfd
        args.distill = _with_term(values, "mfd", args.alpha_fd_loss)
        args.alpha_fd_loss = None
    if values.get("siglip"):
        from .config import DistillConfig, section_from

        d = section_from(DistillConfig, values)
        args.distill = siglip_spec(d.distill, d.recipe, d.overrides)
        for flag in ("recipe", "alpha_ckd_loss", "alpha_icl_loss", "alpha_cross_kd_loss", "alpha_fd_loss",
                     "alpha_gd_loss", "alpha_afd_loss"):
            setattr(args, flag, None)  # folded into the spec
    return args


def _with_term(values: dict, term: str, weight: float) -> str:
    """The resolved spec (recipe, --distill, alias weights) plus `term`=weight, as an explicit --distill."""
    from .config import DistillConfig, section_from
    from .distill.spec import WeightSchedule, format_spec, resolve_spec

    d = section_from(DistillConfig, {**values, "alpha_fd_loss": None})
    resolved = resolve_spec(d.distill, d.recipe, d.overrides) if (d.distill or d.recipe or d.overrides) else None
    terms = dict(resolved.terms) if resolved else {"task": WeightSchedule(1.0)}
    if resolved and resolved.options:
        raise UsageError(f"--mask_ratio with --alpha_fd_loss and {resolved.source}: give the terms with --distill")
    terms[term] = WeightSchedule(float(weight))
    return format_spec(terms)


class ClipKdMaskRatio(argparse.Action):
    """CLIP-KD's --mask_ratio: sets --mask-ratio, and remembers it was given (its --alpha_fd_loss then means mfd)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.clipkd_mask_ratio = values > 0


# ---- docs/compatibility.md ----------------------------------------------------------------------------------------
def render_markdown() -> str:
    lines = [
        "# Compatibility with open_clip_train and CLIP-KD",
        "",
        "Generated by `python -m training.compat > docs/compatibility.md` from `src/training/compat.py`; "
        "`tests/test_compat.py` checks that this file, the table and both tools' parsers agree.",
        "",
        "- **native**: the same flag with the same meaning; **alias**: another spelling of the flag in the third "
        "column; **refused**: the run stops at start-up with one `error:` line that says why and what to use.",
        "- A refused flag given the tool's own default value (column *accepted value*) is accepted: it changes "
        "nothing. On/off flags are refused when given.",
        "- Module: CLIP-KD's `training.main_kd` and `training.main` are both `python -m training.main` here.",
        "",
        "| flag | tools | status | here | accepted value | meaning / reason |",
        "|---|---|---|---|---|---|",
    ]
    for f in sorted(FLAGS, key=lambda f: f.flag.lstrip("-").lower()):
        accepted = "" if f.harmless is None else f"`{f.harmless}`"
        note = f.note.replace("{bnb}", "is checked at start-up").replace("|", "\\|")
        lines.append(f"| `{f.flag}` | {', '.join(f.tools)} | {f.status} | {f'`{f.ours}`' if f.ours else ''} | "
                     f"{accepted} | {note} |")
    from .models import CLIPKD_MODEL_NAMES as MODEL_NAMES

    lines += ["", "CLIP-KD model config names: " + ", ".join(f"`{k}` = `{v}`" for k, v in MODEL_NAMES.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
