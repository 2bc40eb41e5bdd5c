"""Command-line flags of `python -m training.main`. Names follow open_clip's `open_clip_train.params`; CLIP-KD's
own flags are aliases.

Flags come in groups, one per config section (training/config.py); the other entry points (`cache_teacher`,
`eval`) compose the groups they share with their own. Validation that needs more than argparse lives in
`validate_args`. This is the CLI layer: nothing below it imports this module.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re

from . import compat
from .config import Config, comma_list
from .errors import UsageError

log = logging.getLogger(__name__)  # no basicConfig at parse time: main's setup_logging configures the root later


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one UsageError line (argparse would print the usage and exit)."""

    def error(self, message):
        raise UsageError(" ".join(message.split()))


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


REPORT_TO = ("tensorboard", "wandb")


def _report_to(value: str) -> str:
    unknown = [v for v in comma_list(value) if v not in REPORT_TO]
    if unknown:
        raise argparse.ArgumentTypeError(f"unsupported {', '.join(map(repr, unknown))} (supported: "
                                         f"{', '.join(REPORT_TO)})")
    return value


def _layer_spec(value: str) -> str:
    from .models.inherit import parse_layer_spec

    try:
        parse_layer_spec(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('student', 'the student CLIP')
    g.add_argument("--model", default="ViT-T-16", help="student: open_clip name, a config shipped here, or a JSON path")
    g.add_argument("--pretrained", "--model-checkpoint", dest="pretrained", default="",
                   help="student initial weights: pretrained tag or local file (--model-checkpoint: CLIP-KD's name)")
    g.add_argument("--force-image-size", type=int, nargs="+", default=None,
                   help="override the student's image size (one value, or H W when equal)")
    g.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the student")
    g.add_argument("--torchcompile", action="store_true", help="torch.compile the student")
    g.add_argument("--lock-image", action="store_true", help="lock the full student image tower (no gradients)")
    g.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="with --lock-image: leave the last N image tower layer groups unlocked")
    g.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="with --lock-image: freeze BatchNorm running stats of the locked layers")
    g.add_argument("--lock-text", action="store_true", help="lock the full student text tower (no gradients)")
    g.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="with --lock-text: leave the last N text tower layer groups unlocked")
    g.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                   help="with --lock-text: also freeze LayerNorm of the locked layers (HF text towers; open_clip's "
                        "own text transformer always freezes them)")
    g.add_argument("--init-from-teacher", action="store_true",
                   help="weight inheritance (TinyCLIP, DistillCLIP): start a smaller ViT / text-transformer student "
                        "from the (first) --teacher's weights: the layers chosen by --inherit-layers, every tensor "
                        "the leading slice of the teacher's (attention per head); a --resume checkpoint's weights "
                        "win. With --teacher-cache it needs --teacher and --teacher-pretrained")
    g.add_argument("--inherit-layers", type=_layer_spec, default=None, metavar="auto|every:K|i,j,k",
                   help="with --init-from-teacher, the teacher layer each student layer copies, in both towers: "
                        "auto = evenly spaced (floor(i*L_teacher/L_student), default), every:K = teacher layers "
                        "0,K,2K,..., or a list of teacher layers, one per student layer (0,2,5)")
    g.add_argument("--inherit-image-layers", type=_layer_spec, default=None, metavar="auto|every:K|i,j,k",
                   help="with --init-from-teacher: --inherit-layers for the image tower only")
    g.add_argument("--inherit-text-layers", type=_layer_spec, default=None, metavar="auto|every:K|i,j,k",
                   help="with --init-from-teacher: --inherit-layers for the text tower only")


def add_model_build_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('student build options', "open_clip's create_model options for the student")
    g.add_argument("--force-patch-dropout", type=float, default=None,
                   help="FLIP patch dropout: drop this fraction of the student ViT's patch tokens in training")
    g.add_argument("--force-quick-gelu", action="store_true", help="QuickGELU in the student (OpenAI-trained towers)")
    g.add_argument("--force-custom-text", action="store_true", help="build the student as a CustomTextCLIP")
    g.add_argument("--pretrained-image", action="store_true",
                   help="ImageNet (timm) weights for the student's image tower, when its config has them")
    g.add_argument("--cache-dir", default=None,
                   help="download folder of open_clip pretrained tags (student and teacher)")
    g.add_argument("--siglip", action="store_true",
                   help="sigmoid task loss: the task term of the loss spec becomes task_siglip")


def add_optim_choice_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('optimizer and schedule (open_clip)')
    g.add_argument("--opt", default="adamw",
                   help="adamw (torch's), or timm/NAME as open_clip: timm.optim.create_optimizer_v2 over the same "
                        "weight-decay groups (timm/sgd is Nesterov SGD, timm/momentum plain SGD; a bare NAME is timm's)")
    g.add_argument("--momentum", type=float, default=None,
                   help="momentum of a timm SGD-type --opt (timm's default: 0.9)")
    g.add_argument("--skip-scheduler", action="store_true", help="no LR schedule: --lr throughout, no warm-up")
    g.add_argument("--epochs-cooldown", type=int, default=None,
                   help="--lr-scheduler const-cooldown: the last N epochs decay from --lr to --lr-cooldown-end")
    g.add_argument("--lr-cooldown-end", type=float, default=0.0, help="LR at the end of the cooldown")
    g.add_argument("--lr-cooldown-power", type=float, default=1.0, help="cooldown shape: 1 linear, 2 quadratic, ...")


def add_student_kind_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('student kind', 'two-tower CLIP, image-only embedding student, or classifier')
    g.add_argument("--student-kind", default="clip", choices=["clip", "image", "classifier"],
                   help="clip: a two-tower open_clip student; image: an image-only student (any timm model or "
                        "open_clip image tower, projected to the teacher's width) regressing the teacher's image "
                        "embedding (emb), with a zero-shot head from the teacher's text tower saved with it; "
                        "classifier: a timm classifier over the labelled class folder's classes, learning the "
                        "teacher's class logits")
    g.add_argument("--teacher-head", default="text", choices=["text", "linear"],
                   help="classifier: the teacher's class logits from its zero-shot head (class prompts) or from a "
                        "linear probe fitted on its features of the labelled images")
    g.add_argument("--classifier-kd-weight", type=float, default=1.0,
                   help="classifier: weight of the KL to the teacher's logits at --kd-temperature")
    g.add_argument("--classifier-ce-weight", type=float, default=0.0,
                   help="classifier: weight of the cross-entropy on the labelled samples (0: none)")


def check_student_kind(config: Config) -> None:
    """What only a clip student supports, refused in one line for image-only students and classifiers."""
    kind, model = config.model.student_kind, config.model
    if kind == "clip":
        if config.distill.teacher_head != "text" or config.distill.classifier_ce_weight:
            raise UsageError("--teacher-head and --classifier-ce-weight need --student-kind classifier")
        return
    refused = [("--accum-freq > 1", config.optim.accum_freq > 1), ("--init-from-teacher", model.init_from_teacher),
               ("--lock-text", model.lock_text), ("--lock-image", model.lock_image),
               ("--fsdp/--deepspeed/--horovod", config.parallel.engine != "ddp")]
    for flag, given in refused:
        if given:
            raise UsageError(f"{flag} is not supported with --student-kind {kind} (a clip-student option)")
    if kind == "image" and config.distill.teacher_head != "text":
        raise UsageError("--teacher-head needs --student-kind classifier")


def add_teacher_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('teacher', 'the frozen teacher CLIP (one model or an ensemble)')
    g.add_argument("--teacher", "--t-model", "--distill-model", dest="teacher", default=None,
                   help="teacher architecture(s): open_clip name or JSON path; comma list for an ensemble")
    g.add_argument("--teacher-pretrained", "--t-model-checkpoint", "--distill-pretrained", dest="teacher_pretrained",
                   default=None,
                   help="teacher weights: pretrained tag or local file (comma list matching --teacher)")
    g.add_argument("--teacher-compile", action="store_true",
                   help="torch.compile the frozen teacher's forward once at start-up (static shapes)")


def add_teacher_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('teacher cache', 'training from cached teacher embeddings (docs/teacher_cache.md)')
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="train from teacher embeddings cached by python -m training.cache_teacher: no teacher is "
                        "built or run (docs/teacher_cache.md)")
    g.add_argument("--cache-missing", default="error", choices=["error", "skip"],
                   help="a training sample absent from the cache: stop with an error, or skip it (counted as "
                        "skipped/not_in_teacher_cache and replaced, so batches stay full)")
    g.add_argument("--cache-views", default="auto", choices=["auto", "augmented", "all", "centre"],
                   help="cached views a sample draws from each epoch: auto = the augmented views 1..K-1 "
                        "(the centre view 0 when the cache has one view), all = 0..K-1, centre = view 0 only")
    g.add_argument("--cache-verify", default="checksum", choices=["checksum", "size"],
                   help="shard check at start-up: sha256 of every shard (split over ranks), or sizes only")


def add_distill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('distillation', "the loss spec and its terms' options (docs/losses.md)")
    g.add_argument("--distill", default=None,
                   help='loss spec, e.g. "task=1,crd=1,icl=1,fd=2000"; a term may carry a schedule '
                        '"fd=2000@warmup:0:5000" or "crd=1@from:3000"')
    g.add_argument("--recipe", default=None,
                   help="preset: clip-kd | tinyclip | mobileclip | distillclip | open_clip | nvidia | none "
                        "(an explicit --distill overrides it)")
    g.add_argument("--alpha_ckd_loss", "--alpha-ckd-loss", dest="alpha_ckd_loss", type=float, default=None,
                   help="CLIP-KD alias: weight of crd")
    g.add_argument("--alpha_icl_loss", "--alpha-icl-loss", dest="alpha_icl_loss", type=float, default=None,
                   help="CLIP-KD alias: weight of icl")
    g.add_argument("--alpha_cross_kd_loss", "--alpha-cross-kd-loss", dest="alpha_cross_kd_loss", type=float,
                   default=None, help="CLIP-KD alias: weight of xkd (CLIP-KD's cross KD)")
    g.add_argument("--alpha_fd_loss", "--alpha-fd-loss", dest="alpha_fd_loss", type=float, default=None,
                   help="CLIP-KD alias: weight of fd")
    g.add_argument("--alpha_gd_loss", "--alpha-gd-loss", dest="alpha_gd_loss", type=float, default=None,
                   help="CLIP-KD alias: weight of gd")
    g.add_argument("--alpha_afd_loss", "--alpha-afd-loss", dest="alpha_afd_loss", type=float, default=None,
                   help="CLIP-KD alias: weight of afd")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of crd/xkd")
    g.add_argument("--teacher-logit-scale", type=float, default=None,
                   help="fixed teacher scale (instead of exp(teacher.logit_scale)); TinyCLIP uses 50")
    g.add_argument("--teacher-logit-scales", default=None, metavar="S1,S2,...",
                   help="fixed scale per --teacher member, e.g. 70,60 (MobileCLIP2): softmax and sigmoid terms")
    g.add_argument("--teacher-logit-biases", default=None, metavar="B1,B2,...",
                   help="fixed sigmoid bias per --teacher member for sig_kd (default: a SigLIP teacher's own); "
                        "negative values need the = form: --teacher-logit-biases=-10,-12")
    g.add_argument("--sigmoid-chunk", type=int, default=1024,
                   help="rows of the pair matrix the sigmoid terms (task_siglip, sig_kd) evaluate at once: memory "
                        "O(chunk x global batch)")
    g.add_argument("--student-kd-logit-scale", type=float, default=None,
                   help="fixed student scale inside the KD terms (TinyCLIP uses 50)")
    g.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches hidden from the student (mfd)")
    g.add_argument("--mask_ratio", dest="mask_ratio", type=float, action=compat.ClipKdMaskRatio, default=0.5,
                   help="CLIP-KD's spelling of --mask-ratio; with --alpha_fd_loss (CLIP-KD's MFD) the fd weight "
                        "goes to mfd")
    g.add_argument("--feat-layers", default=None, help='feat term layer pairs "s:t,s:t" (default: evenly spaced)')
    g.add_argument("--emb-metric", default="mse", choices=["mse", "l1", "smooth_l1", "cosine"],
                   help="metric of the emb/emb_text terms")
    g.add_argument("--kd-teacher-member", type=int, default=None,
                   help="with a teacher ensemble, the member the feature terms use (default: concatenation)")
    g.add_argument("--kd-auto-balance", default="none", choices=["none", "uncertainty"],
                   help="learned per-term weights (Kendall et al. 2018)")
    g.add_argument("--kd-compat", default="none", choices=["none", "clipkd"],
                   help="clipkd: CLIP-KD's published raw 2.659 scale multipliers for icl/xkd/afd")
    g.add_argument("--local-loss", action="store_true",
                   help="rows of each logit matrix are the local batch only (columns stay global)")
    g.add_argument("--gather-with-grad", action="store_true",
                   help="all-gather student features with gradient (exact gradients; recommended with --local-loss)")


def add_csv_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('CSV tables', 'how CSV rows name their image and caption')
    g.add_argument("--data-root", default=None,
                   help="root joined to relative CSV image paths (training: a comma list matching the CSV list)")
    g.add_argument("--csv-img-key", default="filepath")
    g.add_argument("--csv-caption-key", default="title", help="caption column; '' for a table without captions "
                   "(image-only students)")
    g.add_argument("--csv-separator", default="\t")


def add_data_source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('training data', 'CSV files, WebDataset shards or the synthetic set')
    g.add_argument("--train-data", default=None,
                   help="CSV file(s) (comma list), WebDataset shards (brace patterns, '::' joins sources), or image "
                        "folder(s) without captions (comma list; class folders with classnames.txt carry labels)")
    g.add_argument("--dataset-type", default="auto", type=compat.dataset_type, metavar="|".join(compat.DATASET_TYPES),
                   help="auto: webdataset for .tar patterns, csv for .csv/.tsv/.txt, imagefolder for folders")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (required for WebDataset; caps/extends CSV epochs)")
    g.add_argument("--synthetic-num-samples", type=int, default=1024, help="size of --dataset-type synthetic")
    g.add_argument("--dataset-resampled", action="store_true",
                   help="WebDataset: draw shards with replacement (no fixed epochs; resume starts a fresh seeded stream)")
    g.add_argument("--train-data-upsampling-factors", default=None,
                   help="WebDataset: per-source shard weights joined with '::' (one per '::' source of --train-data); "
                        "needs --dataset-resampled")
    g.add_argument("--wds-caption-key", default="txt",
                   help="WebDataset caption: a tar member extension (txt), else this (dotted) field of the .json member; "
                        "a comma list (txt,syn.txt) or a JSON list value gives several captions per image; '' for "
                        "shards without captions (image-only students)")
    g.add_argument("--captions-per-step", type=int, default=1, choices=[1, 2],
                   help="captions per image and step, drawn from its K captions by (seed, epoch, key): 2 computes "
                        "every term for both and averages them (MobileCLIP's two-caption form)")
    g.add_argument("--datacompdr-teachers", default=None, metavar="D1,D2,...",
                   help="WebDataset shards in Apple's DataCompDR layout (syn.json, paug.json, npz, plus jpg/txt "
                        "joined from DataComp): train from their stored teacher embeddings, of these widths "
                        "(concatenated in the npz); needs --teacher-logit-scales; no --teacher is run")
    g.add_argument("--wds-key-format", default="auto", choices=["auto", "key", "shard"],
                   help="WebDataset sample keys: auto = __key__ (prefixed by the source folder with several sources), "
                        "key = bare __key__, shard = <shard stem>/__key__")
    g.add_argument("--wds-shuffle-buffer", type=int, default=5000, help="WebDataset per-worker sample shuffle buffer")


def add_loader_flags(p: argparse.ArgumentParser, decode_device: bool = False) -> None:
    g = p.add_argument_group('loading')
    g.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    g.add_argument("--workers", type=int, default=2, help="data loader workers per process")
    if decode_device:  # training only
        g.add_argument("--decode-device", default="workers", choices=["workers", "cpu", "cuda"],
                       help="where training images are decoded and cropped: workers = PIL in the data loader workers; "
                            "cpu | cuda = the workers only read the files' bytes and the trainer decodes each batch "
                            "(torchvision decode_jpeg, batched on the GPU by nvjpeg under cuda) and crops there: the "
                            "same crops and flips, pixels within a few grey levels of the workers' (another "
                            "resampling kernel)")


def add_val_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('validation data')
    g.add_argument("--val-data", default=None, help="validation CSV for retrieval metrics")
    g.add_argument("--val-num-samples", type=int, default=None)
    g.add_argument("--val-data-root", default=None,
                   help="root joined to the --val-data CSV's relative image paths (default: the first --data-root)")
    g.add_argument("--val-dataset-type", default="auto", type=compat.val_dataset_type, metavar="auto|csv",
                   help="CLIP-KD's flag: --val-data is a CSV or Karpathy JSON, detected")


def add_optim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('optimisation')
    g.add_argument("--epochs", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--wd", type=float, default=0.2)
    g.add_argument("--beta1", type=float, default=None, help="default 0.9")
    g.add_argument("--beta2", type=float, default=None, help="default by student, as open_clip: 0.98 ViT, else 0.999")
    g.add_argument("--eps", type=float, default=None, help="default by student, as open_clip: 1e-6 ViT, else 1e-8")
    g.add_argument("--warmup", type=int, default=10000, help="warm-up steps")
    g.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "const", "const-cooldown"],
                   help="after warm-up: cosine to 0, constant, or constant then a cooldown (--epochs-cooldown)")
    g.add_argument("--grad-clip-norm", type=float, default=None)
    g.add_argument("--max-nonfinite-steps", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans --epochs)")
    g.add_argument("--accum-freq", type=int, default=1,
                   help="optimizer step every K micro-batches of --batch-size; the losses (contrastive and KD) are those "
                        "of the whole K x batch (GradCache): same result as a K times larger batch")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('runtime', 'device, process group, number format and seed')
    g.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--dist-url", default="env://")
    g.add_argument("--precision", default="amp", type=compat.precision, metavar="|".join(compat.PRECISIONS),
                   help="amp: fp16 autocast + loss scaling on CUDA, bf16 autocast on CPU; amp_bf16: bf16 autocast; "
                        "bf16: bf16 weights and batches (training/precision.py)")
    g.add_argument("--amp-fp16-on-cpu", action="store_true",
                   help="run --precision amp on CPU as on CUDA (fp16 autocast + GradScaler): tests the CUDA path here")
    g.add_argument("--seed", type=int, default=0)


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('parallelism', 'how the student is spread over processes (docs/scale_out.md)')
    g.add_argument("--fsdp", action="store_true",
                   help="shard the student with FSDP2 (fully_shard per block; mixed precision from --precision)")
    g.add_argument("--fsdp-shard-teacher", action="store_true", help="with --fsdp: shard the frozen teacher too")
    g.add_argument("--deepspeed", default=None, metavar="CONFIG.json",
                   help="DeepSpeed ZeRO config (stage 0-3); batch sizes, accumulation, clipping and bf16 come from "
                        "the flags (docs/scale_out.md)")
    g.add_argument("--horovod", action="store_true", help="average student gradients with Horovod (open_clip's flag)")
    g.add_argument("--use-bn-sync", action="store_true",
                   help="under DDP, the student's BatchNorm layers become SyncBatchNorm (statistics over all ranks)")
    g.add_argument("--ddp-static-graph", action="store_true", help="DistributedDataParallel(static_graph=True)")


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('checkpoints')
    g.add_argument("--save-frequency", type=int, default=1,
                   help="save a checkpoint every N epochs; 0: none but the final epoch's (always saved, so the run "
                        "can be resumed or exported)")
    g.add_argument("--save-every-n-steps", type=int, default=None, help="also save mid-epoch every N steps")
    g.add_argument("--keep-last-k", type=int, default=None,
                   help="keep only the newest K checkpoints of the run folder (default: keep all)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    g.add_argument("--save-most-recent", action="store_true",
                   help="also write checkpoints/epoch_latest.pt (the newest state) at every save")
    g.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="keep only the newest checkpoint file (the same as --keep-last-k 1)")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('evaluation during training')
    g.add_argument("--zeroshot-frequency", type=int, default=1, help="zero-shot eval every N epochs (0: never)")
    g.add_argument("--val-frequency", type=int, default=1, help="retrieval eval every N epochs (0: never)")
    g.add_argument("--zeroshot-data", default=None,
                   help="image-folder zero-shot set with classnames.txt (and optional templates.txt)")
    g.add_argument("--eval-datasets", default=None,
                   help="more sets evaluated in training, NAME=PATH comma list as in `python -m training.eval "
                        "--datasets`: zero-shot for classification sets, retrieval for caption sets")
    g.add_argument("--eval-frequency", type=int, default=1, help="--eval-datasets every N epochs (0: never)")


def add_imagenet_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('ImageNet zero-shot (open_clip / CLIP-KD)',
                             'wnid-folder ImageNet sets, zero-shot every --zeroshot-frequency epochs')
    g.add_argument("--imagenet-val", default=None, help="ImageNet-1k validation folder (1000 wnid folders)")
    g.add_argument("--imagenet-v2", default=None, help="ImageNetV2 folder (ImageNetV2-matched-frequency)")
    g.add_argument("--imagenet-r", default=None, help="ImageNet-R folder (200 wnid folders)")
    g.add_argument("--imagenet-a", default=None, help="ImageNet-A folder (200 wnid folders)")
    g.add_argument("--imagenet-sketch", default=None, help="ImageNet-Sketch folder (1000 wnid folders)")
    g.add_argument("--eval", action="store_true",
                   help="CLIP-KD: evaluate the student on every set once (weights: --resume PATH in any checkpoint "
                        "format, else --pretrained) and exit without training")
    g.add_argument("--t-eval", action="store_true", help="CLIP-KD: evaluate the (first) teacher before training")


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('logging')
    g.add_argument("--logs", "--logs-dir", dest="logs", default="./logs",
                   help="root of run folders; '' disables logging and checkpoints. Under torchrun >= 2.6 spell it "
                        "--logs-dir: torchrun's own parser rejects --logs as an abbreviation of its --logs-specs")
    g.add_argument("--name", default=None, help="run folder name (default: a timestamp and the models)")
    g.add_argument("--report-to", type=_report_to, default="",
                   help="comma list of tensorboard, wandb (pip install -e '.[wandb]'), or ''")
    g.add_argument("--log-every-n-steps", type=int, default=100)
    g.add_argument("--tag", default=None, help="CLIP-KD: appended to the default run name as tag_<TAG>")
    g.add_argument("--wandb-project-name", default="open-clip", help="wandb project (--report-to wandb)")
    g.add_argument("--wandb-notes", default="", help="wandb run notes (--report-to wandb)")
    g.add_argument("--remote-sync", default=None, metavar="URL",
                   help="copy the run folder to this fsspec URL (e.g. s3://bucket/runs, /mnt/backup) every "
                        "--remote-sync-frequency seconds, after a checkpoint, and at the end")
    g.add_argument("--remote-sync-frequency", type=int, default=300, help="seconds between remote syncs")
    g.add_argument("--remote-sync-protocol", default="s3", choices=["s3", "fsspec"],
                   help="both copy through fsspec (s3 needs s3fs installed)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m training.main",
        description="Distil a frozen teacher CLIP into a student CLIP (open_clip models).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add in (add_model_flags, add_model_build_flags, add_student_kind_flags, add_teacher_flags, add_distill_flags,
                add_data_source_flags, add_csv_flags, add_val_flags, add_teacher_cache_flags,
                functools.partial(add_loader_flags, decode_device=True), add_optim_flags, add_optim_choice_flags,
                add_runtime_flags, add_parallel_flags, add_checkpoint_flags,
                add_logging_flags, add_eval_flags, add_imagenet_eval_flags, compat.add_refused_flags):
        add(p)
    return p


# Allowed values of every int/float flag (dest: interval; "inf" = unbounded). A flag left unset (None) is not
# checked; NaN and infinities are outside every interval. tests/test_cli.py checks that no numeric flag is missing.
RANGES: dict[str, str] = {
    # student and teacher
    "force_image_size": "[1, inf)",
    "force_patch_dropout": "[0, 1)",
    "lock_image_unlocked_groups": "[0, inf)",
    "lock_text_unlocked_layers": "[0, inf)",
    # distillation
    "alpha_ckd_loss": "[0, inf)", "alpha_icl_loss": "[0, inf)", "alpha_fd_loss": "[0, inf)",
    "alpha_gd_loss": "[0, inf)", "alpha_afd_loss": "[0, inf)", "alpha_cross_kd_loss": "[0, inf)",
    "kd_temperature": "(0, inf)",
    "teacher_logit_scale": "(0, inf)",
    "student_kd_logit_scale": "(0, inf)",
    "sigmoid_chunk": "[1, inf)",
    "mask_ratio": "[0, 1)",
    "kd_teacher_member": "[0, inf)",
    "classifier_kd_weight": "[0, inf)", "classifier_ce_weight": "[0, inf)",
    # data
    "train_num_samples": "[1, inf)",
    "val_num_samples": "[1, inf)",
    "synthetic_num_samples": "[1, inf)",
    "workers": "[0, inf)",
    "wds_shuffle_buffer": "[1, inf)",  # 1 = no shuffling
    "captions_per_step": "[1, 2]",
    # optimisation
    "batch_size": "[1, inf)",
    "epochs": "[1, inf)",
    "lr": "(0, inf)",
    "wd": "[0, inf)",
    "beta1": "[0, 1)",
    "beta2": "[0, 1)",
    "eps": "(0, inf)",
    "warmup": "[0, inf)",
    "grad_clip_norm": "(0, inf)",
    "max_nonfinite_steps": "[1, inf)",
    "seed": "[0, 4294967295]",  # numpy's seed range
    "max_steps": "[1, inf)",
    "accum_freq": "[1, inf)",
    "momentum": "[0, 1)",
    "epochs_cooldown": "[1, inf)",
    "lr_cooldown_end": "[0, inf)",
    "lr_cooldown_power": "(0, inf)",
    # logging, checkpoints, evaluation (a frequency of 0 means never)
    "save_frequency": "[0, inf)",
    "save_every_n_steps": "[1, inf)",
    "keep_last_k": "[1, inf)",
    "log_every_n_steps": "[1, inf)",
    "zeroshot_frequency": "[0, inf)",
    "val_frequency": "[0, inf)",
    "eval_frequency": "[0, inf)",
    "remote_sync_frequency": "[1, inf)",
}

# sub-option -> the flag it needs (without it the sub-option would be ignored silently)
NEEDS = {"lock_image_unlocked_groups": "lock_image", "lock_image_freeze_bn_stats": "lock_image",
         "lock_text_unlocked_layers": "lock_text", "lock_text_freeze_layer_norm": "lock_text",
         "teacher_pretrained": "teacher", "train_data_upsampling_factors": "dataset_resampled",
         "fsdp_shard_teacher": "fsdp", "init_from_teacher": "teacher", "inherit_layers": "init_from_teacher",
         "inherit_image_layers": "init_from_teacher", "inherit_text_layers": "init_from_teacher",
         "t_eval": "teacher", "teacher_compile": "teacher"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_range(dest: str, value) -> None:
    """Raise UsageError unless `value` lies in RANGES[dest]."""
    interval = RANGES[dest]
    low, high = (float(v) for v in interval[1:-1].split(","))
    ok = (low < value or (interval[0] == "[" and value == low)) and (value < high or (interval[-1] == "]" and
                                                                                      value == high))
    if not ok:  # also false for NaN
        allowed = f"{'>=' if interval[0] == '[' else '>'} {low:g}" if high == float("inf") else f"in {interval}"
        shown = f"{value:g}" if isinstance(value, float) else value
        raise UsageError(f"{_flag(dest)} must be {allowed}, got {shown}")


def check_open_clip_options(config: Config) -> None:
    """The open_clip options that only mean something together (each failure one line)."""
    optim, log_cfg = config.optim, config.logging
    if optim.lr_scheduler == "const-cooldown" and optim.epochs_cooldown is None:
        raise UsageError("--lr-scheduler const-cooldown needs --epochs-cooldown N (the epochs of the cooldown)")
    if optim.epochs_cooldown is not None:
        if optim.lr_scheduler != "const-cooldown":
            raise UsageError("--epochs-cooldown needs --lr-scheduler const-cooldown")
        if optim.epochs_cooldown >= optim.epochs:
            raise UsageError(f"--epochs-cooldown {optim.epochs_cooldown} must be below --epochs {optim.epochs}")
    if optim.skip_scheduler and (optim.lr_scheduler != "cosine" or optim.epochs_cooldown is not None):
        raise UsageError("--skip-scheduler keeps --lr constant: drop --lr-scheduler/--epochs-cooldown")
    from .optim import check_optimizer

    check_optimizer(optim)
    wandb = "wandb" in comma_list(log_cfg.report_to)
    if log_cfg.wandb_notes and not wandb:
        raise UsageError("--wandb-notes needs --report-to wandb")
    if wandb:
        from .logger import check_wandb

        check_wandb()
    if log_cfg.remote_sync:
        from .remote_sync import check_remote

        check_remote(log_cfg)
    if config.eval.eval and config.checkpoint.resume == "latest":
        raise UsageError("--eval evaluates the weights of --resume PATH (a file) or --pretrained, not 'latest'")


def validate_args(args: argparse.Namespace) -> Config:
    """Start-up checks of the flags that need more than argparse; each failure is one UsageError line."""
    compat.normalize(args)  # the foreign flags whose meaning is more than a spelling (training/compat.py)
    values = vars(args)
    for dest in RANGES:
        if values.get(dest) is not None:
            check_range(dest, values[dest])
    for dest, needed in NEEDS.items():
        if values[dest] and not values[needed]:  # given a non-default (0 / off) value
            raise UsageError(f"{_flag(dest)} needs {_flag(needed)}")
    config = Config.from_args(args)
    check_student_kind(config)
    teacher, distill, name = config.teacher, config.distill, config.logging.name
    if teacher.teacher is not None and not teacher.models:
        raise UsageError(f"--teacher {teacher.teacher!r} names no model")
    if name and (os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")):
        raise UsageError(f"--name {name!r} must stay inside --logs (no absolute path, no '..')")
    check_open_clip_options(config)
    if config.checkpoint.resume == "latest" and not name:
        raise UsageError("--resume latest needs --name (the run folder to resume)")
    member = distill.kd_teacher_member
    if member is not None and teacher.models and member >= len(teacher.models):
        raise UsageError(f"--kd-teacher-member {member} is out of range for {len(teacher.models)} --teacher "
                         "model(s) (members count from 0)")
    from .distill.spec import check_combinations, parse_member_values, resolve_spec

    for flag, text in (("--teacher-logit-scales", distill.teacher_logit_scales),
                       ("--teacher-logit-biases", distill.teacher_logit_biases)):
        values = parse_member_values(text, flag)
        if values is not None and teacher.models and len(values) != len(teacher.models):
            raise UsageError(f"{flag} lists {len(values)} value(s) for {len(teacher.models)} --teacher model(s)")
        if values is not None and flag == "--teacher-logit-scales" and not all(v > 0 for v in values):
            raise UsageError(f"--teacher-logit-scales values must be > 0, got {text}")
    if distill.teacher_logit_scales and distill.teacher_logit_scale is not None:
        raise UsageError("--teacher-logit-scale and --teacher-logit-scales both fix the teacher scale: give one")
    if config.data.datacompdr_teachers is not None:
        from .data import dataset_type
        from .data.datacompdr import parse_widths

        widths = parse_widths(config.data.datacompdr_teachers)
        if teacher.teacher or teacher.teacher_cache:
            raise UsageError("--datacompdr-teachers trains from the embeddings stored in the shards: drop "
                             "--teacher/--teacher-cache")
        if dataset_type(config.data) != "webdataset":
            raise UsageError("--datacompdr-teachers reads WebDataset shards (--dataset-type webdataset)")
        scales = parse_member_values(distill.teacher_logit_scales, "--teacher-logit-scales")
        if scales is None or len(scales) != len(widths):
            raise UsageError(f"--datacompdr-teachers {config.data.datacompdr_teachers}: DataCompDR shards do not "
                             f"store the teachers' logit scales; pass --teacher-logit-scales with {len(widths)} "
                             "value(s) (e.g. 100,100)")
    check_decode_device(config)
    if config.data.captions_per_step > 1 and config.optim.accum_freq > 1:
        raise UsageError("--captions-per-step 2 does not combine with --accum-freq > 1 yet (the cached micro-batch "
                         "outputs hold one caption per image): use one of the two")
    if distill.local_loss and not distill.gather_with_grad:
        log.warning("--local-loss without --gather-with-grad: with more than one process the gradient through the "
                    "other ranks' features (the logit columns) is dropped, as in open_clip; add --gather-with-grad "
                    "for exact gradients")
    spec = resolve_spec(distill.distill, distill.recipe, distill.overrides)  # a bad spec fails before any model loads
    check_combinations(spec.terms, distill.feat_layers)
    return config


def check_decode_device(config: Config) -> None:
    """--decode-device cpu|cuda needs encoded images (not the synthetic set's arrays) and, for cuda, a CUDA device."""
    decode = config.data.decode_device
    if decode == "workers":
        return
    if decode == "cuda":
        import torch

        if not torch.cuda.is_available() or config.runtime.device == "cpu":
            raise UsageError("--decode-device cuda needs the run on a CUDA device ("
                             + ("--device cpu" if torch.cuda.is_available() else "this machine has none")
                             + "): use --decode-device cpu or workers")

    from .data import dataset_type

    if dataset_type(config.data) == "synthetic":
        raise UsageError(f"--decode-device {decode} decodes image files; the synthetic set has none: use "
                         "--decode-device workers")


def parse_args(argv=None) -> argparse.Namespace:
    """The flags as parsed and validated (the flat namespace; `parse_config` gives the typed sections)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def parse_config(argv=None) -> Config:
    """The typed configuration of a training run, parsed and validated once."""
    return validate_args(build_parser().parse_args(argv))
