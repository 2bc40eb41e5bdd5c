"""`python -m training.export CKPT OUT_DIR --hf`: open_clip's Hugging Face layout, loaded by a Python that cannot
import this project, gives the trained student's embeddings; the model card; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

import training  # noqa: F401  (registers tiny-student / tiny-teacher here, in the parent only)
from helpers import write_image_csv
from test_eval_support import write_folder
from training.eval.cli import main as eval_main
from training.export import main as export_main
from training.main import main as train_main
from training.models import create_clip

CAPTIONS = ["a red square", "a blue circle on a white background"]

# Runs under `python -I -S`: no PYTHONPATH, no working directory, no site processing (so no .pth file, and the
# editable install's path to src/ is never added); only the folder that holds open_clip and torch is put back.
CHILD = r"""
import importlib.util, sys
site_dir, out_dir, inputs, result = sys.argv[1:5]
sys.path.append(site_dir)
assert importlib.util.find_spec("training") is None, "the child can import training"
import open_clip, torch
from PIL import Image
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)
model.eval()
data = torch.load(inputs, weights_only=True)
pixels = preprocess(Image.open(data["image_path"])).unsqueeze(0)
tokens = tokenizer(data["captions"])
with torch.no_grad():
    out = {"random_image": model.encode_image(data["image"]), "pixels": pixels,
           "file_image": model.encode_image(pixels), "tokens": tokens, "text": model.encode_text(tokens),
           "logit_scale": model.logit_scale.detach().clone()}
torch.save(out, result)
assert "training" not in sys.modules, "open_clip imported training"
"""


@pytest.fixture(scope="module")
def run(module_tmp_path):
    """A tiny student distilled for 2 steps through the training CLI, and a real evaluation of it."""
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=8, size=64)
    torch.manual_seed(11)
    teacher = str(root / "teacher.pt")
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    assert train_main(["--model", "tiny-student", "--teacher", "tiny-teacher", "--teacher-pretrained", teacher,
                       "--train-data", csv, "--data-root", str(root / "data"), "--batch-size", "4", "--epochs", "1",
                       "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--workers", "0",
                       "--logs", str(root / "logs"), "--name", "kd", "--zeroshot-frequency", "0",
                       "--val-frequency", "0", "--device", "cpu", "--recipe", "clip-kd"]) == 0
    ckpt = str(root / "logs" / "kd" / "checkpoints" / "epoch_1.pt")
    names = ["red square", "blue circle"]
    write_folder(root / "demo", names, [(0, 0), (1, 1), (1, 0), (0, 1)])
    evaluation = root / "eval"
    assert eval_main(["--model", "tiny-student", "--pretrained", ckpt, "--teacher", "tiny-teacher",
                      "--teacher-pretrained", teacher, "--tasks", "zeroshot", "--datasets", f"demo={root / 'demo'}",
                      "--output", str(evaluation), "--workers", "0", "--batch-size", "4"]) == 0
    return {"root": root, "ckpt": ckpt, "teacher": teacher, "csv": csv, "eval": evaluation}


def _student(ckpt: str) -> torch.nn.Module:
    """The trained student as this project loads it (the reference the export must reproduce)."""
    model = create_clip("tiny-student", None, torch.device("cpu"))
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    return model.eval()


def _load_in_fresh_python(out_dir: str, tmp_path) -> dict:
    site_dir = os.path.dirname(os.path.dirname(open_clip.__file__))
    assert not os.path.exists(os.path.join(site_dir, "training")), "training is installed as a plain package"
    image_path = str(tmp_path / "photo.png")
    Image.new("RGB", (90, 70), (200, 30, 40)).save(image_path)
    torch.manual_seed(5)
    inputs = {"image": torch.randn(2, 3, 64, 64), "image_path": image_path, "captions": CAPTIONS}
    torch.save(inputs, tmp_path / "inputs.pt")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # set on purpose: -I must ignore it (the child checks)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, site_dir, out_dir, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "result.pt")], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**torch.load(tmp_path / "result.pt", weights_only=True), **inputs}


def test_hf_folder_loads_without_the_project_and_matches_the_student(run, tmp_path):
    out = str(tmp_path / "kd-tiny")
    assert export_main([run["ckpt"], out, "--hf", "--eval-dir", str(run["eval"])]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors",
                                       "retention.png"]
    config = json.loads(open(os.path.join(out, "open_clip_config.json")).read())
    with open(os.path.join(os.path.dirname(training.__file__), "model_configs", "tiny-student.json")) as f:
        assert config["model_cfg"] == json.load(f)  # the full shipped config: plain open_clip needs no registration
    assert config["preprocess_cfg"] == {"mean": [0.48145466, 0.4578275, 0.40821073],
                                        "std": [0.26862954, 0.26130258, 0.27577711],
                                        "interpolation": "bicubic", "resize_mode": "shortest"}
    from safetensors.torch import load_file

    student = _student(run["ckpt"])
    assert set(load_file(os.path.join(out, "open_clip_model.safetensors"))) == set(student.state_dict())

    got = _load_in_fresh_python(out, tmp_path)
    _, _, reference_preprocess = open_clip.create_model_and_transforms("tiny-student")
    pixels = reference_preprocess(Image.open(got["image_path"])).unsqueeze(0)
    tokens = open_clip.get_tokenizer("tiny-student")(CAPTIONS)
    assert torch.equal(got["pixels"], pixels)
    assert torch.equal(got["tokens"], tokens)
    with torch.no_grad():
        for key, reference in (("random_image", student.encode_image(got["image"])),
                               ("file_image", student.encode_image(pixels)), ("text", student.encode_text(tokens))):
            assert got[key].shape == reference.shape
            assert torch.allclose(got[key], reference, atol=1e-6, rtol=1e-5), key
    assert torch.equal(got["logit_scale"], student.logit_scale.detach())
    # the trained weights, not the architecture's random init, are what travelled
    fresh = create_clip("tiny-student", None, torch.device("cpu")).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_text(tokens), got["text"], atol=1e-3)


def test_model_card_gives_the_run_and_the_evaluation(run, tmp_path):
    out = tmp_path / "card"
    assert export_main([run["ckpt"], str(out), "--hf", "--eval-dir", str(run["eval"]), "--name", "tiny-kd",
                        "--license", "mit"]) == 0
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: open_clip" in front and "license: mit" in front
    assert body.startswith("# tiny-kd\n")
    assert "**Architecture:** `tiny-student`" in card and "embedding dim 64" in card
    assert f"**Teacher:** `tiny-teacher` with weights `{run['teacher']}`" in card
    assert f"**Training data:** `{run['csv']}`" in card
    assert "**Loss:** `task=1,crd=1,icl=1,fd=2000` (from --recipe clip-kd)" in card  # the clip-kd recipe's spec
    assert "2 optimizer steps done" in card
    summary = json.loads((run["eval"] / "summary.json").read_text())
    top1 = summary["student"]["metrics"]["zeroshot/demo/top1"]
    teacher_top1 = summary["teacher"]["metrics"]["zeroshot/demo/top1"]
    assert f"| `zeroshot/demo/top1` | {100 * top1:.2f} | {100 * teacher_top1:.2f} |" in card
    retention = (run["eval"] / "retention.md").read_text().splitlines()
    assert retention[0].startswith("# ")
    table = [ln for ln in retention if ln.startswith("|")]
    assert len(table) >= 3 and all(ln in card.splitlines() for ln in table)  # the eval's retention table, whole
    assert "![teacher vs student retention](retention.png)" in card
    assert (out / "retention.png").read_bytes() == (run["eval"] / "retention.png").read_bytes()
    recorded = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    assert recorded == torch.load(run["ckpt"], weights_only=True)["args"]


def test_overwrite_replaces_the_export(run, tmp_path, capsys):
    out = tmp_path / "again"
    assert export_main([run["ckpt"], str(out), "--hf", "--eval-dir", str(run["eval"])]) == 0
    (out / "notes.txt").write_text("mine")
    assert export_main([run["ckpt"], str(out), "--hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--overwrite" in err and "\n" not in err
    assert export_main([run["ckpt"], str(out), "--hf", "--overwrite"]) == 0
    # no evaluation this time: the old chart goes, the card has no results; files that are not ours stay
    assert sorted(os.listdir(out)) == ["README.md", "notes.txt", "open_clip_config.json",
                                       "open_clip_model.safetensors"]
    assert "## Evaluation" not in (out / "README.md").read_text()


def _one_line_error(argv, capsys, match):
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err


def test_bad_input_is_a_one_line_error(run, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    _one_line_error([str(garbage), str(out), "--hf"], capsys, "cannot read checkpoint")
    _one_line_error([str(tmp_path / "missing.pt"), str(out), "--hf"], capsys, "checkpoint not found")
    _one_line_error([run["ckpt"], str(out), "--hf", "--eval-dir", str(tmp_path / "no-eval")], capsys,
                    "evaluation folder not found")
    (tmp_path / "empty-eval").mkdir()
    _one_line_error([run["ckpt"], str(out), "--hf", "--eval-dir", str(tmp_path / "empty-eval")], capsys,
                    "has no summary.json")
    (tmp_path / "empty-eval" / "summary.json").write_text('{"student": [1, 2]}')
    _one_line_error([run["ckpt"], str(out), "--hf", "--eval-dir", str(tmp_path / "empty-eval")], capsys,
                    "is not a training.eval summary")
    (tmp_path / "empty-eval" / "summary.json").write_text("{not json")
    _one_line_error([run["ckpt"], str(out), "--hf", "--eval-dir", str(tmp_path / "empty-eval")], capsys,
                    "cannot read")
    assert not out.exists()  # nothing written before the inputs are checked
    _one_line_error([run["ckpt"], str(garbage), "--hf"], capsys, "is not a folder")
    _one_line_error([run["ckpt"], str(tmp_path / "s.pt"), "--eval-dir", str(run["eval"])], capsys, "needs --hf")


def test_bare_weights_export_with_model_and_an_honest_card(run, tmp_path, capsys):
    bare = str(tmp_path / "student.safetensors")
    assert export_main([run["ckpt"], bare]) == 0  # the plain export: weights only, no recorded run
    out = tmp_path / "bare"
    _one_line_error([bare, str(out), "--hf"], capsys, "does not record its architecture: pass --model")
    assert export_main([bare, str(out), "--hf", "--model", "tiny-student"]) == 0
    card = (out / "README.md").read_text()
    for what in ("Teacher", "Training data", "Loss", "Student initialisation"):
        assert f"**{what}:** not recorded" in card
    model = open_clip.create_model("local-dir:" + str(out))
    student = _student(run["ckpt"])
    exported, trained = model.state_dict(), student.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_a_student_trained_at_a_forced_image_size_exports_at_that_size(run, tmp_path):
    """--force-image-size changes the positional embedding: both export forms rebuild the student at that size."""
    from training.export import main as export_main
    from training.models import read_state_dict

    assert train_main(["--model", "tiny-student", "--force-image-size", "48", "--train-data", run["csv"],
                       "--data-root", str(run["root"] / "data"), "--batch-size", "4", "--epochs", "1", "--lr", "1e-3",
                       "--warmup", "1", "--precision", "fp32", "--workers", "0", "--logs", str(tmp_path / "logs"),
                       "--name", "small", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu"]) == 0
    ckpt = str(tmp_path / "logs" / "small" / "checkpoints" / "epoch_1.pt")
    trained = torch.load(ckpt, weights_only=True)["model"]
    assert export_main([ckpt, str(tmp_path / "small.pt")]) == 0
    exported = read_state_dict(str(tmp_path / "small.pt"))
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert export_main([ckpt, str(tmp_path / "hf"), "--hf"]) == 0
    config = json.loads((tmp_path / "hf" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 48
