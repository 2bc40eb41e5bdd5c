"""Bad input gives one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

from helpers import write_image_csv


def _run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "training.main", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_image_csv(str(root), n=8), str(root)


CASES = {
    "unknown model": (["--model", "ViT-T-61"], "unknown model 'ViT-T-61'"),
    "unreadable checkpoint": (["--teacher", "tiny-teacher", "--teacher-pretrained", "{root}/train.csv"],
                              "cannot read checkpoint"),
    "missing data file": (["--train-data", "{root}/missing.csv"], "data file not found"),
    "malformed distill spec": (["--teacher", "tiny-teacher", "--distill", "task=1,crd=abc"], "crd"),
    "unknown distill term": (["--teacher", "tiny-teacher", "--distill", "task=1,bogus=2"], "bogus"),
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
