"""Deploy: image-student exports, ONNX export (parity with PyTorch, dynamic batch, INT8) and `training.predict` end to
end on a PyTorch checkpoint and on an ONNX file."""

import json
import os

import pytest
import torch

from test_image_students import CLASSES, COMMON, class_folder, loose_folder
from training.export import main as export_main
from training.main import main as train_main
from training.models.image_student import load_image_student
from training.predict import main as predict_main

onnx_missing = None
try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ImportError as exc:
    onnx_missing = f"the onnx extra is not installed ({exc}): pip install 'clip-kd[onnx]'"
needs_onnx = pytest.mark.skipif(onnx_missing is not None, reason=onnx_missing or "")


@pytest.fixture(scope="module")
def trained(module_tmp_path):
    """An image-only student trained through the CLI, with its zero-shot head, and its data."""
    root = module_tmp_path
    lab, unl = class_folder(root / "lab"), loose_folder(root / "unl")
    logs = str(root / "logs")
    assert train_main(["--student-kind", "image", *COMMON, "--train-data", f"{lab},{unl}", "--zeroshot-data", lab,
                       "--zeroshot-frequency", "0", "--logs", logs, "--name", "img"]) == 0
    return {"root": root, "lab": lab, "unl": unl, "ckpt": os.path.join(logs, "img", "checkpoints", "epoch_1.pt")}


def _predictions(path):
    with open(path) as f:
        return json.load(f)["predictions"]


def test_image_student_exports_round_trip(trained, tmp_path):
    ref = load_image_student(trained["ckpt"]).eval()
    x = torch.randn(2, 3, 32, 32)
    for name in ("student.pt", "student.safetensors"):
        out = str(tmp_path / name)
        assert export_main([trained["ckpt"], out]) == 0
        got = load_image_student(out).eval()
        assert got.classnames == CLASSES
        torch.testing.assert_close(got(x), ref(x), rtol=0, atol=0)


def test_predict_on_a_checkpoint_skips_an_unreadable_image(trained, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = str(tmp_path / "p.json")
    assert predict_main([trained["ckpt"], os.path.join(trained["lab"], "red"), str(bad), "--top-k", "3",
                         "--output", out]) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}: corrupt image" in captured.err
    preds = _predictions(out)
    assert len(preds) == 4 and all(len(p["top"]) == 3 for p in preds)
    # the probabilities are the softmax of the saved head's logits, computed here from the student directly
    from PIL import Image

    from training.data.transforms import EvalTransform

    student = load_image_student(trained["ckpt"]).eval()
    x = EvalTransform(student.image_format)(Image.open(preds[0]["image"]).convert("RGB"))[None]
    with torch.no_grad():
        probs = (student.logit_scale.exp() * torch.nn.functional.normalize(student.encode_image(x), dim=-1)
                 @ student.class_embeddings.T).softmax(-1)[0]
    best = int(probs.argmax())
    assert preds[0]["top"][0] == {"label": CLASSES[best], "probability": pytest.approx(float(probs[best]), abs=1e-6)}
    with open(out) as f:
        assert json.load(f)["skipped"] == [{"image": str(bad), "reason": "corrupt_image"}]


@pytest.mark.parametrize("argv, message", [
    (["MISSING_MODEL", "IMG"], "model file not found"),
    (["CKPT", "/no/such/image.jpg"], "image not found: /no/such/image.jpg"),
    (["CKPT", "BAD"], "no readable image among the 1 given"),
    (["CKPT", "IMG", "--labels", " , "], "names no label"),
    (["CKPT", "IMG", "--labels", "cat,dog"], "it has no text tower for --labels"),
])
def test_predict_errors_are_one_line_exit_2(trained, tmp_path, capsys, argv, message):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"garbage")
    subst = {"MISSING_MODEL": str(tmp_path / "nope.pt"), "CKPT": trained["ckpt"], "BAD": str(bad),
             "IMG": os.path.join(trained["lab"], "red", "0.png")}
    assert predict_main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_class_head_that_does_not_fit_the_student_is_exit_2(trained, tmp_path, capsys):
    state = torch.load(trained["ckpt"], weights_only=True)
    state["model"]["class_embeddings"] = torch.randn(3, 64)  # the student embeds into 128
    bad = str(tmp_path / "bad_head.pt")
    torch.save(state, bad)
    assert predict_main([bad, os.path.join(trained["lab"], "red", "0.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the student" in err[0], err


@needs_onnx
def test_onnx_image_student_parity_dynamic_batch_and_predict(trained, tmp_path, capsys):
    import onnxruntime as ort

    out = str(tmp_path / "onnx")
    assert export_main([trained["ckpt"], out, "--onnx", "--onnx-int8", "--calib-images", "16"]) == 0
    student = load_image_student(trained["ckpt"]).eval()
    sess = ort.InferenceSession(os.path.join(out, "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # dynamic batch
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = student(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 3) and abs(got - want).max() <= 1e-4
    int8 = onnx.load(os.path.join(out, "image_encoder.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert os.path.getsize(os.path.join(out, "image_encoder.int8.onnx")) < os.path.getsize(
        os.path.join(out, "image_encoder.onnx"))
    # predict on the ONNX file gives the checkpoint's predictions
    image_dir = os.path.join(trained["lab"], "green")
    assert predict_main([trained["ckpt"], image_dir, "--output", str(tmp_path / "torch.json")]) == 0
    assert predict_main([os.path.join(out, "image_encoder.onnx"), image_dir, "--output",
                         str(tmp_path / "onnx.json")]) == 0
    assert predict_main([os.path.join(out, "image_encoder.int8.onnx"), image_dir]) == 0
    for a, b in zip(_predictions(tmp_path / "torch.json"), _predictions(tmp_path / "onnx.json")):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)


@needs_onnx
def test_onnx_two_tower_student_text_and_image_parity_and_zero_shot_predict(tmp_path):
    import onnxruntime as ort
    import open_clip

    from training.models import create_clip

    torch.manual_seed(0)
    clip = create_clip("tiny-student", None, torch.device("cpu")).eval()
    ckpt = str(tmp_path / "epoch_1.pt")
    torch.save({"model": clip.state_dict(), "args": {"model": "tiny-student", "student_kind": "clip"}}, ckpt)
    out = str(tmp_path / "onnx")
    assert export_main([ckpt, out, "--onnx"]) == 0
    image = ort.InferenceSession(os.path.join(out, "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(os.path.join(out, "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 64, 64)
    tokens = open_clip.get_tokenizer("tiny-student")(["a red circle", "two blue stars at the top", "x", "y", "z"])
    with torch.no_grad():
        want_i = torch.nn.functional.normalize(clip.encode_image(x), dim=-1).numpy()
        want_t = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1).numpy()
    assert abs(image.run(None, {"image": x.numpy()})[0] - want_i).max() <= 1e-4
    assert abs(text.run(None, {"text": tokens.numpy()})[0] - want_t).max() <= 1e-4
    folder = loose_folder(tmp_path / "imgs", n=4)
    for model, name in ((ckpt, "torch"), (os.path.join(out, "image_encoder.onnx"), "onnx")):
        assert predict_main([model, folder, "--labels", "red, green,blue", "--templates", "simple",
                             "--output", str(tmp_path / f"{name}.json")]) == 0
    for a, b in zip(_predictions(tmp_path / "torch.json"), _predictions(tmp_path / "onnx.json")):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-4)
    assert predict_main([ckpt, folder]) == 2  # a two-tower model needs --labels
