"""Bad input gives one line on stderr and exit code 2, never a traceback."""

import argparse
import logging
import os
import subprocess
import sys

import pytest

from helpers import write_image_csv
from training.main import main
from training.params import RANGES, build_parser, parse_args


def _run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "training.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def csv(module_tmp_path):
    root = module_tmp_path
    (root / "bad.json").write_text('{"embed_dim": 64, "vision_cfg": {')
    return write_image_csv(str(root), n=8), str(root)


CASES = {
    "unknown model": (["--model", "ViT-T-61"], "unknown model 'ViT-T-61'"),
    "unreadable checkpoint": (["--teacher", "tiny-teacher", "--teacher-pretrained", "{root}/train.csv"],
                              "cannot read checkpoint"),
    "missing data file": (["--train-data", "{root}/missing.csv"], "data file not found"),
    "malformed distill spec": (["--teacher", "tiny-teacher", "--distill", "task=1,crd=abc"], "crd"),
    "unknown distill term": (["--teacher", "tiny-teacher", "--distill", "task=1,bogus=2"], "bogus"),
    "negative batch size": (["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    "invalid JSON model config": (["--model", "{root}/bad.json"], "bad.json is not valid JSON"),
    "mfd with feat": (["--teacher", "tiny-teacher", "--distill", "task=1,mfd=1,feat=1"], "mfd and feat"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(csv, case, tmp_path):
    path, root = csv
    extra, message = CASES[case]
    base = ["--model", "tiny-student", "--train-data", path, "--data-root", root, "--logs", str(tmp_path),
            "--device", "cpu", "--workers", "0", "--batch-size", "4", "--epochs", "1", "--precision", "fp32"]
    result = _run(*base, *[a.format(root=root) for a in extra])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# flag, value, message: every one exits 2 with one line, before any model or data is built
BAD_FLAGS = [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--lr", "0", "--lr must be > 0, got 0"),
    ("--lr", "nan", "--lr must be > 0, got nan"),
    ("--lr", "inf", "--lr must be > 0, got inf"),
    ("--wd", "-0.1", "--wd must be >= 0, got -0.1"),
    ("--beta1", "1", "--beta1 must be in [0, 1), got 1"),
    ("--beta2", "-0.5", "--beta2 must be in [0, 1), got -0.5"),
    ("--eps", "0", "--eps must be > 0, got 0"),
    ("--warmup", "-1", "--warmup must be >= 0, got -1"),
    ("--workers", "-1", "--workers must be >= 0, got -1"),
    ("--mask-ratio", "1", "--mask-ratio must be in [0, 1), got 1"),
    ("--kd-temperature", "0", "--kd-temperature must be > 0, got 0"),
    ("--teacher-logit-scale", "-50", "--teacher-logit-scale must be > 0, got -50"),
    ("--student-kd-logit-scale", "0", "--student-kd-logit-scale must be > 0, got 0"),
    ("--save-frequency", "-1", "--save-frequency must be >= 0, got -1"),
    ("--save-every-n-steps", "0", "--save-every-n-steps must be >= 1, got 0"),
    ("--log-every-n-steps", "0", "--log-every-n-steps must be >= 1, got 0"),
    ("--max-steps", "0", "--max-steps must be >= 1, got 0"),
    ("--accum-freq", "0", "--accum-freq must be >= 1, got 0"),
    ("--max-nonfinite-steps", "0", "--max-nonfinite-steps must be >= 1, got 0"),
    ("--grad-clip-norm", "0", "--grad-clip-norm must be > 0, got 0"),
    ("--zeroshot-frequency", "-1", "--zeroshot-frequency must be >= 0, got -1"),
    ("--val-frequency", "-2", "--val-frequency must be >= 0, got -2"),
    ("--eval-frequency", "-1", "--eval-frequency must be >= 0, got -1"),
    ("--train-num-samples", "0", "--train-num-samples must be >= 1, got 0"),
    ("--val-num-samples", "0", "--val-num-samples must be >= 1, got 0"),
    ("--synthetic-num-samples", "0", "--synthetic-num-samples must be >= 1, got 0"),
    ("--wds-shuffle-buffer", "0", "--wds-shuffle-buffer must be >= 1, got 0"),
    ("--force-image-size", "0", "--force-image-size must be >= 1, got 0"),
    ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
    ("--alpha_fd_loss", "-1", "--alpha-fd-loss must be >= 0, got -1"),
    ("--kd-teacher-member", "-1", "--kd-teacher-member must be >= 0, got -1"),
    ("--lock-image-unlocked-groups", "-1", "--lock-image-unlocked-groups must be >= 0, got -1"),
    ("--lock-text-unlocked-layers", "-1", "--lock-text-unlocked-layers must be >= 0, got -1"),
    ("--batch-size", "abc", "argument --batch-size: invalid int value: 'abc'"),
]


@pytest.mark.parametrize("flag, value, message", BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_out_of_range_numbers_exit_2_with_one_line(capsys, flag, value, message):
    assert main([flag, value, "--device", "cpu", "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert numeric == set(RANGES), numeric ^ set(RANGES)
    parse_args([])  # every default is inside its own range
    # edges that are allowed
    args = parse_args(["--save-frequency", "0", "--warmup", "0", "--workers", "0", "--mask-ratio", "0", "--wd", "0",
                       "--beta1", "0", "--zeroshot-frequency", "0", "--seed", "4294967295"])
    assert args.save_frequency == 0 and args.seed == 4294967295


@pytest.mark.parametrize("extra, message", [
    (["--lock-image-unlocked-groups", "2"], "--lock-image-unlocked-groups needs --lock-image"),
    (["--lock-image-freeze-bn-stats"], "--lock-image-freeze-bn-stats needs --lock-image"),
    (["--lock-text-unlocked-layers", "1"], "--lock-text-unlocked-layers needs --lock-text"),
    (["--lock-text-freeze-layer-norm"], "--lock-text-freeze-layer-norm needs --lock-text"),
    (["--teacher", "tiny-teacher", "--kd-teacher-member", "1"],
     "--kd-teacher-member 1 is out of range for 1 --teacher model(s)"),
    (["--teacher-pretrained", "t.pt"], "--teacher-pretrained needs --teacher"),
    (["--train-data-upsampling-factors", "1::2"], "--train-data-upsampling-factors needs --dataset-resampled"),
    (["--teacher", " , "], "--teacher ' , ' names no model"),
    (["--name", "../elsewhere"], "--name '../elsewhere' must stay inside --logs"),
    (["--name", "/tmp/run"], "--name '/tmp/run' must stay inside --logs"),
    (["--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--report-to", "mlflow"], "argument --report-to: unsupported 'mlflow' (supported: tensorboard, wandb)"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--decode-device", "cuda"], "--decode-device cuda needs the run on a CUDA device"),
    (["--decode-device", "gpu"], "argument --decode-device: invalid choice: 'gpu'"),
    (["--decode-device", "cpu"], "--decode-device cpu decodes image files; the synthetic set has none"),
])
def test_inconsistent_flags_exit_2_with_one_line(capsys, extra, message):
    assert main([*extra, "--device", "cpu", "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_local_loss_without_gather_with_grad_warns(caplog):
    with caplog.at_level(logging.WARNING):
        parse_args(["--local-loss"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "--local-loss without --gather-with-grad" in warned[0]
    assert "add --gather-with-grad" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_args(["--local-loss", "--gather-with-grad"])
        parse_args([])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_lock_flags_parse_like_open_clip():
    args = parse_args([])
    assert (args.lock_image, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats) == (False, 0, False)
    assert (args.lock_text, args.lock_text_unlocked_layers, args.lock_text_freeze_layer_norm) == (False, 0, False)
    args = parse_args(["--lock-image", "--lock-image-unlocked-groups", "2", "--lock-image-freeze-bn-stats",
                       "--lock-text", "--lock-text-unlocked-layers", "1", "--lock-text-freeze-layer-norm"])
    assert (args.lock_image, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats) == (True, 2, True)
    assert (args.lock_text, args.lock_text_unlocked_layers, args.lock_text_freeze_layer_norm) == (True, 1, True)
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["lock_image"] != argparse.SUPPRESS and "--lock-image" in build_parser().format_help()
