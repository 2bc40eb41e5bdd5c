"""Every script CLIP-KD publishes (tests/data/clipkd_scripts.py: the baselines, the method ablations, the ViT-B-16,
RN101 and LAION teachers, the eval scripts) goes through our parser with only the module name changed: it parses
and builds its run configuration (flags validated, models resolved, loss spec and evaluation sets), or, where the
script itself is broken, stops with one line."""

import os
import runpy

import pytest

import training  # noqa: F401
from training.config import Config
from training.distill.spec import resolve_spec
from training.errors import UsageError
from training.main import main
from training.models import resolve_model_name
from training.params import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = runpy.run_path(os.path.join(ROOT, "tests", "data", "clipkd_scripts.py"))["SCRIPTS"]
CLIPKD_RECIPE = {"task": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}
# the scripts under methods/: the loss terms each one trains here
METHODS = {"CRD": {"task": 1.0, "crd": 1.0}, "FD": {"task": 1.0, "fd": 2000.0}, "ICL": {"task": 1.0, "icl": 1.0},
           "MFD": {"task": 1.0, "mfd": 2000.0},
           "AFD": {"task": 1.0, "crd": 1.0}}  # AFD.sh passes the CRD flag (--alpha_ckd_loss), not --alpha_afd_loss
BROKEN = {"script/methods/GD.sh": "argument --alpha_gd_loss/--alpha-gd-loss: invalid float value: '1e8.'"}


def localise(argv: list[str], tmp) -> list[str]:
    """The placeholder paths (path/to/..., ./pretrained_models/...) moved under tmp."""
    return [a.replace("path/to/", f"{tmp}/").replace("./pretrained_models/", f"{tmp}/pretrained_models/")
            for a in argv]


def build(argv: list[str]) -> Config:
    config = parse_config(argv)
    resolve_model_name(config.model.model)
    for teacher in config.teacher.models:
        resolve_model_name(teacher)
    return config


def test_every_published_script_is_here():
    folders = {name.split("/")[1] for name in SCRIPTS}
    assert folders == {"baseline", "methods", "ViT_B_16_KD", "RN101_KD", "ViT_B_16_KD_Laion", "ViT_L_14_KD_Laion",
                       "eval"}
    assert len(SCRIPTS) == 34


@pytest.mark.parametrize("name", sorted(SCRIPTS), ids=lambda n: n.removeprefix("script/"))
def test_clipkd_script_builds_its_run_or_names_its_own_bug(name, tmp_path):
    module, argv = SCRIPTS[name]
    assert module in ("training.main", "training.main_kd")  # both are python -m training.main here
    argv = localise(argv, tmp_path)
    if name in BROKEN:
        with pytest.raises(UsageError) as err:
            build(argv)
        assert str(err.value) == BROKEN[name]
        return
    config = build(argv)
    folder, script = name.split("/")[1], os.path.basename(name)[:-3]
    spec = resolve_spec(config.distill.distill, config.distill.recipe, config.distill.overrides)
    weights = {term: schedule.value for term, schedule in spec.terms.items()}
    if module == "training.main":
        assert config.teacher.teacher is None and weights == {"task": 1.0}
    elif folder == "methods":
        assert weights == METHODS[script], weights
        assert config.distill.mask_ratio == (0.75 if script == "MFD" else 0.5)
    else:
        assert weights == CLIPKD_RECIPE and config.teacher.teacher_pretrained.startswith(str(tmp_path))
    # the flags every training script shares, with their meaning
    assert (config.data.batch_size, config.optim.lr, config.optim.wd, config.optim.epochs) == (128, 1e-3, 0.1, 32)
    assert config.eval.imagenet_val == f"{tmp_path}/imagenet/val/"
    assert config.data.val_data_root is not None and config.logging.tag is not None
    assert f"tag_{config.logging.tag}" in config.default_run_name()
    vit = "vit" in config.model.model.lower()
    assert (config.optim.beta2, config.optim.eps) == ((0.98, 1e-6) if vit else (0.999, 1e-8))
    if folder == "eval":
        assert config.eval.eval and config.checkpoint.resume == f"{tmp_path}/model.pt"
        assert [n for n, _, _ in config.eval.imagenet_sets] == ["imagenet-val", "imagenet-v2", "imagenet-r",
                                                                  "imagenet-a", "imagenet-sketch"]


def test_the_rn101_to_rn18_script_trains_mobilenetv3():
    """A fact of the published script, kept visible: script/RN101_KD/RN18_kd.sh passes --model
    timm_mobilenetv3_small_100 (the same student as mobilenetv3_small_100_kd.sh)."""
    argv = SCRIPTS["script/RN101_KD/RN18_kd.sh"][1]
    assert argv[argv.index("--model") + 1] == "timm_mobilenetv3_small_100"


def test_the_broken_gd_script_exits_2_with_one_line(tmp_path, capsys):
    assert main(localise(SCRIPTS["script/methods/GD.sh"][1], tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {BROKEN['script/methods/GD.sh']}"]
