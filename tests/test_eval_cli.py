"""`python -m training.eval`: a full run with real tiny open_clip models, and exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers tiny-student / tiny-teacher)
from test_eval_support import id_image, write_folder, write_retrieval_csv
from training.eval.cli import main


@pytest.fixture(scope="module")
def data(module_tmp_path):
    root = module_tmp_path
    names = ["red square", "blue circle"]
    write_folder(root / "demo" / "train", names, [(0, 0), (1, 1)] * 3, templates=None)
    write_folder(root / "demo" / "test", names, [(0, 0), (1, 1), (1, 0)])
    with open(root / "demo" / "classnames.txt", "w") as f:
        f.write("\n".join(names) + "\n")
    write_retrieval_csv(root / "ret")
    torch.manual_seed(0)
    student = open_clip.create_model("tiny-student")
    torch.save({"model": {f"module.{k}": v for k, v in student.state_dict().items()}, "epoch": 1, "step": 3},
               root / "epoch_1.pt")  # a training checkpoint (DDP prefix on purpose)
    torch.save(open_clip.create_model("tiny-teacher").state_dict(), root / "teacher.pt")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    return root


def test_full_run_with_teacher_writes_json_report_and_cache(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--model", "tiny-student", "--pretrained", str(data / "epoch_1.pt"), "--teacher", "tiny-teacher",
               "--teacher-pretrained", str(data / "teacher.pt"), "--tasks", "zeroshot,retrieval,linear_probe",
               "--datasets", f"demo={data / 'demo'},csv={data / 'ret' / 'val.csv'}", "--data-root",
               str(data / "ret"), "--output", str(out), "--workers", "0", "--batch-size", "4",
               "--lp-wd-grid", "1e-3,1e-1", "--lp-max-iter", "50"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| metric | teacher | student | retention % |" in printed
    for role, model in (("student", "tiny-student"), ("teacher", "tiny-teacher")):
        files = sorted(os.listdir(out / role))
        assert files == ["csv__zeroshot_retrieval.json", "demo__linear_probe.json", "demo__zeroshot_classification.json"]
        rec = json.loads((out / role / "demo__zeroshot_classification.json").read_text())
        assert rec["model"] == model and rec["task"] == "zeroshot_classification" and rec["dataset"] == "demo"
        assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
        assert rec["details"]["num_samples"] == 3
        ret = json.loads((out / role / "csv__zeroshot_retrieval.json").read_text())
        assert "image_retrieval_recall@1" in ret["metrics"] and "text_retrieval_recall@10" in ret["metrics"]
        lp = json.loads((out / role / "demo__linear_probe.json").read_text())
        assert set(lp["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert (out / "retention.png").stat().st_size > 1000
    md = (out / "retention.md").read_text()
    assert "Linear probe" in md and "Parameters (M)" in md
    summary = json.loads((out / "summary.json").read_text())
    assert "zeroshot/demo/top1" in summary["student"]["metrics"] and summary["retention_percent"]
    assert len(os.listdir(out / "feature_cache")) == 4  # (student, teacher) x (train, test)

    # --skip-existing reuses every result file; the numbers stay the same
    rc = main(["--model", "tiny-student", "--pretrained", str(data / "epoch_1.pt"), "--datasets",
               f"demo={data / 'demo'}", "--output", str(out), "--workers", "0", "--skip-existing"])
    assert rc == 0 and "reusing" in capsys.readouterr().out


def _expect_usage_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err


def test_bad_input_exits_2_with_one_line(data, tmp_path, capsys):
    base = ["--model", "tiny-student", "--output", str(tmp_path), "--workers", "0"]
    demo = f"demo={data / 'demo'}"
    _expect_usage_error(base + ["--datasets", f"cifar10={tmp_path / 'nope'}"], capsys, "dataset path not found")
    os.makedirs(tmp_path / "empty")
    _expect_usage_error(base + ["--datasets", f"bogus={tmp_path / 'empty'}"], capsys, "unknown dataset 'bogus'")
    _expect_usage_error(base + ["--datasets", demo, "--tasks", "zeroshot,captioning"], capsys, "unknown task")
    _expect_usage_error(base + ["--datasets", demo, "--pretrained", str(data / "garbage.pt")], capsys,
                        "cannot read checkpoint")
    _expect_usage_error(base + ["--datasets", demo, "--pretrained", str(tmp_path / "missing.pt")], capsys,
                        "checkpoint not found")
    _expect_usage_error(base + ["--datasets", demo, "--pretrained", str(data / "teacher.pt")], capsys,
                        "does not match")
    _expect_usage_error(["--model", "tiny-student"], capsys, "--datasets")
    _expect_usage_error(base + ["--datasets", demo, "--model", "no-such-model"], capsys, "unknown model")
    _expect_usage_error(base + ["--datasets", f"imagenet-a={data / 'demo' / 'test'}"], capsys, "wnid")
    _expect_usage_error(base + ["--datasets", demo, "--tasks", "retrieval"], capsys, "nothing to do")


def test_numbered_folders_are_refused_not_scored_as_imagenet_v2(data, tmp_path, capsys):
    # the bug: 10 folders 0..9 without classnames.txt ran as ImageNet-V2 (1000 classes), printed 0.00 and exited 0
    for c in range(10):
        os.makedirs(tmp_path / "digits" / str(c))
        id_image(c).save(tmp_path / "digits" / str(c) / "a.png")
    base = ["--model", "tiny-student", "--output", str(tmp_path / "out"), "--workers", "0", "--tasks", "zeroshot"]
    for datasets in (str(tmp_path / "digits"), f"digits={tmp_path / 'digits'}"):
        _expect_usage_error(base + ["--datasets", datasets], capsys,
                            "add classnames.txt with one class name per line, in sorted folder order")
    assert not os.path.exists(tmp_path / "out")
    # a detected kind is said out loud
    assert main(base + ["--datasets", str(data / "demo"), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"detected {data / 'demo'} as folder" in out and "classnames.txt" in out


def test_in_training_eval_sets_refuse_numbered_folders_and_log_what_they_took(data, tmp_path, caplog):
    import argparse
    import logging

    from training.config import Config
    from training.errors import UsageError
    from training.eval.hook import TrainingEvaluator

    def build_evaluator(args):
        c = Config.from_args(args)
        TrainingEvaluator(c.eval, c.data, c.runtime, c.optim.epochs)

    for c in range(3):
        os.makedirs(tmp_path / "digits" / str(c))
        id_image(c).save(tmp_path / "digits" / str(c) / "a.png")
    args = argparse.Namespace(zeroshot_data=str(tmp_path / "digits"), val_data=None, eval_datasets=None)
    with pytest.raises(UsageError, match="add classnames.txt"):
        build_evaluator(args)
    args = argparse.Namespace(zeroshot_data=str(data / "demo" / "train"), val_data=None,
                              eval_datasets=f"imagenetv2={tmp_path / 'digits'}")
    with caplog.at_level(logging.INFO):
        build_evaluator(args)
    text = caplog.text
    assert "detected" in text and "as folder" in text  # --zeroshot-data: what it was taken for
    assert "3 of ImageNet-V2's 1000 class folders" in text  # a named subset: said out loud


def test_subprocess_bad_checkpoint_has_no_traceback(data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.eval", "--model", "tiny-student", "--pretrained",
                           str(data / "garbage.pt"), "--datasets", f"demo={data / 'demo'}", "--output",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: cannot read")


def test_the_old_module_name_runs_the_same_command_line():
    import training.evaluate

    assert training.evaluate.main is main  # `python -m training.evaluate` keeps working
