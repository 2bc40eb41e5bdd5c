"""open_clip_train's and CLIP-KD's command lines against ours: every flag of either parser is supported (same config
field, a value of its type is taken) or refused with one line naming it; docs/compatibility.md is the table.

open_clip_train's parser is read from the installed package, so a flag a new open_clip version adds fails here.
"""

import argparse
import os
import runpy
from unittest import mock

import pytest

import training  # noqa: F401
from training import compat
from training.config import Config
from training.errors import UsageError
from training.params import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPKD_FLAGS = runpy.run_path(os.path.join(ROOT, "tests", "data", "clipkd_flags.py"))["CLIPKD_FLAGS"]


def open_clip_actions() -> list[argparse.Action]:
    """The actions of open_clip_train.params.parse_args's parser, captured when it parses."""
    from open_clip_train import params

    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        with pytest.raises(SystemExit):
            params.parse_args([])
    return [a for a in captured["parser"]._actions if a.option_strings and a.dest != "help"]


OPEN_CLIP = {a.option_strings[0]: a for a in open_clip_actions()}
OURS = {s: a for a in build_parser()._actions for s in a.option_strings}
# a value of the flag's type where a generic one would not name a real choice
SAMPLES = {"--opt": "timm/sgd", "--lr-scheduler": "const-cooldown", "--device": "cuda", "--model": "ViT-T-16",
           "--resume": "latest", "--train-data-upsampling-factors": "1::2", "--report-to": "wandb",
           "--dist-backend": "gloo", "--force-image-size": "224", "--remote-sync": "/tmp/remote",
           "--teacher": "ViT-B-16", "--distill-model": "ViT-B-16", "--t-model": "ViT-B-16"}


def parse(argv):
    return compat.normalize(build_parser().parse_args(argv))


def samples(flag: str, kind, choices=None, nargs=None) -> list[list[str]]:
    """Command lines giving `flag` one value of its kind (every choice when it has choices)."""
    if kind == "switch":
        return [[flag]]
    if choices:
        return [[flag, str(c)] for c in choices]
    if flag in SAMPLES:
        return [[flag, SAMPLES[flag]]]
    value = {"int": "3", "float": "0.5", "float+": "0.5"}.get(kind, "x")
    return [[flag, value] + ([value] if nargs == "+" else [])]


def _kind(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    t = getattr(action.type, "__name__", None)
    return {"int": "int", "float": "float"}.get(t, "str")


def _expected(dest: str, value):
    """What our parser stores for open_clip's value (our spellings of the same meaning)."""
    if dest == "precision":
        return compat.PRECISION_SPELLINGS.get(value, value)
    if dest == "force_image_size":
        return value[0] if isinstance(value, list) else value
    return value


def check_refused(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(argv)
    message = str(err.value)
    assert "\n" not in message and flag in message, message


def check_flag(flag: str, kind: str, choices, nargs, converted=None) -> None:
    entry = compat.BY_FLAG.get(flag)
    assert entry is not None, f"{flag}: not in training/compat.py's FLAGS table (supported or refused?)"
    if entry.status == "refused":
        for argv in samples(flag, kind, choices, nargs):
            if entry.harmless is not None and converted and converted(argv[1]) == entry.harmless:
                continue
            check_refused(argv, flag)
        if entry.harmless is not None:  # its default changes nothing, so it is accepted
            parse([flag, str(entry.harmless)])
        return
    ours = OURS[entry.ours]
    assert flag in OURS and OURS[flag].dest == ours.dest, f"{flag} is not our {entry.ours}"
    assert ours.dest in Config().flat(), f"{flag}: its dest {ours.dest} is no config field"
    for argv in samples(flag, kind, choices, nargs):
        try:
            args = parse(argv)
        except UsageError as exc:  # a choice we refuse: one line naming the flag
            assert choices and "\n" not in str(exc) and flag in str(exc), exc
            continue
        if kind == "switch":
            assert getattr(args, ours.dest) is True or ours.dest == "delete_previous_checkpoint"
        elif converted is not None:
            value = [converted(v) for v in argv[1:]] if nargs == "+" else converted(argv[1])
            assert getattr(args, ours.dest) == _expected(ours.dest, value), argv


@pytest.mark.parametrize("flag", sorted(OPEN_CLIP), ids=str)
def test_every_open_clip_flag_is_supported_or_refused_with_a_reason(flag):
    action = OPEN_CLIP[flag]
    assert "open_clip" in compat.BY_FLAG[flag].tools if flag in compat.BY_FLAG else True
    converted = action.type if callable(action.type) else (lambda v: v)
    check_flag(flag, _kind(action), action.choices, action.nargs, None if action.nargs == "*" else converted)


@pytest.mark.parametrize("flag", sorted(CLIPKD_FLAGS), ids=str)
def test_every_clipkd_flag_is_supported_or_refused_with_a_reason(flag):
    kind, _default = CLIPKD_FLAGS[flag]
    choices = kind if isinstance(kind, tuple) else None
    converted = {"int": int, "float": float, "float+": float}.get(kind, str)
    check_flag(flag, "str" if choices else kind, choices, "+" if kind == "float+" else None, converted)


def test_the_table_names_each_tool_only_for_its_own_flags():
    for f in compat.FLAGS:
        assert ("open_clip" in f.tools) == (f.flag in OPEN_CLIP), f.flag
        assert ("CLIP-KD" in f.tools) == (f.flag in CLIPKD_FLAGS), f.flag


def test_the_docs_table_is_the_generated_one():
    with open(os.path.join(ROOT, "docs", "compatibility.md")) as f:
        assert f.read() == compat.render_markdown(), "regenerate: python -m training.compat > docs/compatibility.md"


@pytest.mark.parametrize("argv, fragment", [
    (["--torchscript"], "--torchscript is not supported here: a TorchScript student"),
    (["--coca-caption-loss-weight", "3"], "CoCa"),
    (["--use-bnb-linear", "Linear8bitLt"], "bitsandbytes"),
    (["--precision", "fp16"], "argument --precision: 'fp16' is not supported"),
    (["--dataset-type", "icar"], "argument --dataset-type: CLIP-KD's 'icar'"),
    (["--val-dataset-type", "webdataset"], "argument --val-dataset-type: 'webdataset' is not supported"),
])
def test_a_refusal_is_one_line_that_says_why(argv, fragment):
    with pytest.raises(UsageError) as err:
        parse(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_harmless_defaults_of_refused_flags_are_accepted():
    args = parse(["--coca-caption-loss-weight", "2.0", "--coca-contrastive-loss-weight", "1", "--num-per-class", "1"])
    assert not hasattr(args, "coca_caption_loss_weight")  # refused flags are no config fields


def test_model_dependent_adam_defaults_follow_open_clip():
    from open_clip_train.params import get_default_params

    for model in ("ViT-T-16", "timm-resnet18", "RN50"):
        args = parse(["--model", model])
        expected = get_default_params(model)
        assert (args.beta1, args.beta2, args.eps) == (expected["beta1"], expected["beta2"], expected["eps"])
    assert parse(["--model", "RN50", "--beta2", "0.9"]).beta2 == 0.9


def test_delete_previous_checkpoint_is_keep_last_k_1():
    assert parse(["--delete-previous-checkpoint"]).keep_last_k == 1
    with pytest.raises(UsageError, match="--delete-previous-checkpoint keeps one"):
        parse(["--delete-previous-checkpoint", "--keep-last-k", "3"])


def test_clipkd_mask_ratio_with_fd_weight_is_mfd():
    from training.distill.spec import resolve_spec

    args = parse(["--alpha_fd_loss", "2000.", "--mask_ratio", "0.75"])
    assert args.distill == "task=1,mfd=2000" and args.mask_ratio == 0.75 and args.alpha_fd_loss is None
    assert parse(["--alpha_fd_loss", "2000."]).distill is None  # FD.sh: plain fd
    assert parse(["--mask-ratio", "0.3", "--alpha_fd_loss", "1"]).distill is None  # our spelling: only the ratio
    cfg = Config.from_args(parse(["--alpha_ckd_loss", "1", "--alpha_fd_loss", "5", "--mask_ratio", "0.5"]))
    spec = resolve_spec(cfg.distill.distill, cfg.distill.recipe, cfg.distill.overrides)
    assert {n: s.value for n, s in spec.terms.items()} == {"task": 1.0, "crd": 1.0, "mfd": 5.0}


def test_alpha_cross_kd_loss_weights_xkd():
    from training.distill.spec import resolve_spec

    cfg = Config.from_args(parse(["--alpha_cross_kd_loss", "0.5"]))
    assert resolve_spec(None, None, cfg.distill.overrides).terms["xkd"].value == 0.5


def test_siglip_rewrites_the_task_term():
    assert compat.siglip_spec("task=1,crd=2", None, {}) == "task_siglip=1,crd=2"
    assert compat.siglip_spec(None, None, {"icl": 1.0}) == "task_siglip=1,icl=1"
    assert compat.siglip_spec(None, "clip-kd", {}) == "task_siglip=1,crd=1,icl=1,fd=2000"
    assert compat.siglip_spec("task_siglip=1", None, {}) == "task_siglip=1"  # normalising twice changes nothing
    args = parse(["--siglip", "--alpha_icl_loss", "1"])
    assert args.distill == "task_siglip=1,icl=1" and args.alpha_icl_loss is None
    with pytest.raises(UsageError, match="has none"):
        compat.siglip_spec("crd=1", None, {})


def test_clipkd_model_names_resolve_to_the_same_architectures():
    from training.models import CLIPKD_MODEL_NAMES, resolve_model_name

    for theirs, ours in CLIPKD_MODEL_NAMES.items():
        assert resolve_model_name(theirs) == ours
    assert resolve_model_name("timm-mobilevit_xxs") == "timm-mobilevit_xxs"


def test_open_clip_logs_none_writes_no_run_folder():
    assert parse(["--logs", "None"]).logs == "" and parse(["--logs", "./runs"]).logs == "./runs"
