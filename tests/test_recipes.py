"""Every launcher (scripts/recipes/*.sh, slurm/*.sh) only passes flags that exist, with CLIP-KD's published settings.

Each script runs with DRY_RUN=1 (it prints its command, one argument per line) and the arguments after
`-m training.main` go through the real `training.params.build_parser()`.
"""

import glob
import os
import subprocess

import open_clip
import pytest

import training  # noqa: F401
from training.models import resolve_model_name
from training.params import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "scripts", "recipes", "*.sh"))
                 if not p.endswith("common.sh"))
SLURM = sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sh")))
ENV = {"CC3M_CSV": "/data/cc3m_train.csv", "CC12M_CSV": "/data/cc12m.csv", "TEACHER_CKPT": "/ckpt/teacher.pt",
       "IMAGENET_VAL": "/data/imagenet/val", "VAL_CSV": "/data/cc3m_val.csv", "MASTER_ADDR": "node1",
       "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "DRY_RUN": "1"}


def dry_run(script: str, *args: str, env: dict | None = None) -> list[str]:
    result = subprocess.run(["bash", script, *args], env={**os.environ, **ENV, **(env or {})}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "training.main" in lines, lines
    return lines


def training_args(lines: list[str]):
    argv = lines[lines.index("training.main") + 1:]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse prints the unknown/invalid flag on stderr
        raise AssertionError(f"flags rejected by training.params: {argv}") from exc


def test_there_is_a_launcher_for_every_published_setting():
    names = {os.path.basename(p)[:-3] for p in RECIPES}
    students = ["vit_t16", "mobilevit_s", "swin_t", "mobilenetv3_s", "efficientnet_b0", "resnet18"]
    expected = {f"kd_vitb16_{s}" for s in students} | {f"kd_rn101_{s}" for s in students[1:]}
    expected |= {"kd_laion_vitb16_vit_t16", "kd_laion_vitb16_rn50", "kd_laion_vitl14_vit_t16", "kd_laion_vitl14_vitb16"}
    expected |= {f"baseline_{s}" for s in students + ["vitb16", "rn50", "rn101"]}
    assert expected <= names, expected - names
    assert {os.path.basename(p) for p in SLURM} >= {"vit_t_kd.sh", "timm_student_kd.sh"}


@pytest.mark.parametrize("script", RECIPES + SLURM, ids=lambda p: os.path.relpath(p, ROOT))
def test_launcher_flags_exist_and_follow_the_published_recipe(script):
    lines = dry_run(script)
    args = training_args(lines)
    assert (args.batch_size, args.epochs, args.lr, args.wd, args.warmup) == (128, 32, 1e-3, 0.1, 10000)
    assert args.train_data == "/data/cc3m_train.csv,/data/cc12m.csv"
    assert (args.csv_img_key, args.csv_caption_key, args.dataset_type) == ("filepath", "title", "csv")
    assert args.resume == "latest" and args.name and args.logs  # auto-resume of a fixed run name
    assert args.zeroshot_data == "/data/imagenet/val" and args.val_data == "/data/cc3m_val.csv"
    resolve_model_name(args.model)  # an open_clip model or a config shipped here
    if os.path.basename(script).startswith("baseline_"):
        assert args.recipe == "none" and args.teacher is None
    else:
        assert args.recipe == "clip-kd" or (args.alpha_ckd_loss, args.alpha_icl_loss, args.alpha_fd_loss) == (1, 1, 2000)
        resolve_model_name(args.teacher)
        if "laion" in os.path.basename(script):
            assert args.teacher_pretrained in open_clip.list_pretrained_tags_by_model(args.teacher)
        else:
            assert args.teacher_pretrained == "/ckpt/teacher.pt"
    if script in SLURM:
        launcher = lines[:lines.index("training.main")]
        assert launcher[:2] == ["srun", "--kill-on-bad-exit=1"] and "torchrun" in launcher
        assert "--rdzv_endpoint=node1:20042" in launcher and "--nnodes=2" in launcher


def test_extra_flags_reach_training_and_are_checked():
    script = os.path.join(ROOT, "scripts", "recipes", "kd_vitb16_vit_t16.sh")
    args = training_args(dry_run(script, "--fsdp", env={"EXTRA_ARGS": "--accum-freq 2 --batch-size 64"}))
    assert args.fsdp and args.accum_freq == 2 and args.batch_size == 64


def test_slurm_scripts_declare_requeue_and_a_graceful_signal():
    for script in SLURM:
        text = open(script).read()
        for directive in ("--nodes=", "--gpus-per-node=", "--cpus-per-task=", "--time=", "--requeue", "--signal="):
            assert f"#SBATCH {directive}" in text, (script, directive)
        # the trap asks the trainer to checkpoint (the stop file it watches), waits for it, then requeues
        assert "scontrol requeue" in text and "trap stop_and_requeue USR1" in text
        assert 'touch "$LOGS/$NAME/stop"' in text and 'wait "$TRAIN_PID"' in text
