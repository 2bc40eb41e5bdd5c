"""ONNX export of a student (`python -m training.export CKPT OUT_DIR --onnx [--onnx-int8]`), and the predictor
that runs the files.

    OUT_DIR/image_encoder.onnx        image [B, 3, S, S] float32 -> logits [B, C] (a student with a class head:
                                      image-only students, classifiers) or L2-normalised embedding [B, D] (CLIP)
    OUT_DIR/text_encoder.onnx         two-tower students: tokens [B, L] int64 -> L2-normalised embedding [B, D]
    OUT_DIR/image_encoder.int8.onnx   --onnx-int8: static INT8 (QDQ, per-channel weights) calibrated on training
                                      images with onnxruntime's quantizer

The batch axis is dynamic; the opset is OPSET. Each file carries its own description as ONNX metadata
(`clip_kd`: kind, architecture, preprocessing, outputs, class names, logit scale, context length), so
`python -m training.predict FILE.onnx ...` needs nothing else (two-tower: the sibling text_encoder.onnx and the
architecture's tokenizer). Every export is checked against PyTorch on a random batch of 3 (fp32, max abs
difference <= PARITY_ATOL).
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import EvalTransform, ImageFormat
from .errors import UsageError

OPSET = 17
PARITY_ATOL = 1e-4
META_KEY = "clip_kd"
IMAGE_FILE, TEXT_FILE, INT8_FILE = "image_encoder.onnx", "text_encoder.onnx", "image_encoder.int8.onnx"


def require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UsageError(f"ONNX export and inference need the optional extras: pip install 'clip-kd[onnx]' "
                         f"(onnx, onnxruntime) ({exc})") from None
    return onnx, onnxruntime


class ClipImageEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image):
        return F.normalize(self.clip.encode_image(image), dim=-1)


class ClipTextEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, text):
        return F.normalize(self.clip.encode_text(text), dim=-1)


def describe(model: nn.Module, arch: str) -> dict:
    """The metadata of an export of `model` (an ImageStudent, or an open_clip CLIP)."""
    from .models.image_student import ImageStudent

    if isinstance(model, ImageStudent):
        fmt = model.image_format
        return {"kind": model.kind, "arch": arch, "image_format": fmt.as_dict(), "classnames": model.classnames,
                "outputs": "logits" if model.has_head else "embedding",
                "logit_scale": float(model.logit_scale.exp()) if model.kind == "image" else 1.0}
    import open_clip

    tokenizer = open_clip.get_tokenizer(arch)
    return {"kind": "clip", "arch": arch, "image_format": ImageFormat.from_model(model).as_dict(), "classnames": [],
            "outputs": "embedding", "logit_scale": float(model.logit_scale.detach().exp()),
            "context_length": int(getattr(tokenizer, "context_length", 77)), "text_encoder": TEXT_FILE}


def export_module(module: nn.Module, example: torch.Tensor, path: str, input_name: str, output_name: str,
            meta: dict) -> None:
    onnx, _ = require_onnx()
    from .fileio import atomic_path

    module = module.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks (constants here)
        torch.onnx.export(module, (example,), tmp, input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
        model = onnx.load(tmp)
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        onnx.save(model, tmp)


def session(path: str):
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def parity(module: nn.Module, path: str, example: torch.Tensor) -> float:
    """Max abs difference between onnxruntime and PyTorch on `example` (fp32)."""
    sess = session(path)
    with torch.no_grad():
        want = module(example).float().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    return float(np.abs(got - want).max())


def read_meta(path: str) -> dict:
    onnx, _ = require_onnx()
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise UsageError(f"cannot read ONNX file {path}: {exc}") from None
    for entry in model.metadata_props:
        if entry.key == META_KEY:
            return json.loads(entry.value)
    raise UsageError(f"{path} is not an export of training.export --onnx (no '{META_KEY}' metadata)")


# ---- INT8 -----------------------------------------------------------------------------------------------------------

def calibration_images(source: str, count: int, data_root: str | None = None, img_key: str = "filepath"
                       ) -> list[str]:
    """Up to `count` image paths for calibration, spread evenly over an image folder or a CSV's rows."""
    from .data.csv import read_csv_table
    from .eval.datasets import list_images

    if os.path.isdir(source):
        paths = list_images(source)
    elif os.path.isfile(source):
        paths = read_csv_table([source], [data_root] if data_root else [], img_key, "", "\t")[0]
    else:
        raise UsageError(f"--calib-data not found: {source}")
    if not paths:
        raise UsageError(f"no calibration image in {source}")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def quantize_int8(fp32_path: str, out_path: str, images: list[str], fmt: ImageFormat, batch_size: int = 16) -> int:
    """Static INT8 quantisation (QDQ, per-channel weights, MinMax calibration); returns the images used."""
    require_onnx()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .data.csv import open_image
    from .fileio import atomic_path

    transform = EvalTransform(fmt)
    good = []
    for path in images:
        image, _ = open_image(path)
        if image is not None:
            good.append(transform(image))
    if not good:
        raise UsageError("no readable calibration image")
    name = session(fp32_path).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: torch.stack(good[i:i + batch_size]).numpy()}
                                 for i in range(0, len(good), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = read_meta(fp32_path)
    with atomic_path(out_path) as tmp:
        quant_pre_process(fp32_path, tmp)  # shape inference and graph optimisation, as onnxruntime recommends
        quantize_static(tmp, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load(tmp)
        if not any(e.key == META_KEY for e in model.metadata_props):
            entry = model.metadata_props.add()
            entry.key, entry.value = META_KEY, json.dumps({**meta, "int8": True})
            onnx.save(model, tmp)
    return len(good)


# ---- the export -----------------------------------------------------------------------------------------------------

def export_onnx(checkpoint: str, out_dir: str, model_name: str | None = None, int8: bool = False,
                calib_data: str | None = None, calib_images: int = 256) -> dict:
    """Write the ONNX files of the student in `checkpoint` to `out_dir`; returns {file: parity or note}."""
    require_onnx()
    from .export import recorded_args, released
    from .models.image_student import load_image_student

    checkpoint, model_name = released(checkpoint, model_name)
    os.makedirs(out_dir, exist_ok=True)
    args = recorded_args(checkpoint) if not checkpoint.endswith(".safetensors") else {}
    student = load_image_student(checkpoint)
    report: dict = {}
    torch.manual_seed(0)
    if student is not None:
        student.eval()
        fmt, arch, image_module = student.image_format, student.arch, student
        meta = describe(student, arch)
        output = "logits" if student.has_head else "embedding"
    else:
        from .models import create_clip
        from .models.weights import quiet_random_init_warning

        arch = model_name or args.get("model")
        if arch is None:
            raise UsageError(f"{checkpoint} does not record its architecture: pass --model")
        size = args.get("force_image_size")
        with quiet_random_init_warning():
            clip = create_clip(arch, checkpoint, torch.device("cpu"), **({"force_image_size": size} if size else {}))
        clip.eval()
        arch = clip.arch_name
        fmt, image_module, meta, output = ImageFormat.from_model(clip), ClipImageEncoder(clip), describe(clip, arch), \
            "embedding"
        import open_clip

        tokens = open_clip.get_tokenizer(arch)(["a photo of a cat", "a dog", "x"])
        text_path = os.path.join(out_dir, TEXT_FILE)
        text_module = ClipTextEncoder(clip).eval()
        export_module(text_module, tokens, text_path, "text", "embedding", meta)
        report[TEXT_FILE] = parity(text_module, text_path, tokens)
    example = torch.randn(3, 3, fmt.size, fmt.size)
    image_path = os.path.join(out_dir, IMAGE_FILE)
    export_module(image_module, example, image_path, "image", output, meta)
    report[IMAGE_FILE] = parity(image_module, image_path, example)
    for name, diff in report.items():
        if diff > PARITY_ATOL:
            raise UsageError(f"{name}: onnxruntime differs from PyTorch by {diff:.2e} (> {PARITY_ATOL:g}); the "
                             "export is not faithful")
        logging.info("%s: onnxruntime vs PyTorch max abs difference %.2e", name, diff)
    if int8:
        source = calib_data or (args.get("train_data") or "").split(",")[0]
        if not source:
            raise UsageError("--onnx-int8 calibrates on training images: pass --calib-data FOLDER|CSV")
        root = (args.get("data_root") or "").split(",")[0] or None
        images = calibration_images(source, calib_images, root, args.get("csv_img_key") or "filepath")
        used = quantize_int8(image_path, os.path.join(out_dir, INT8_FILE), images, ImageFormat(**meta["image_format"]))
        report[INT8_FILE] = f"calibrated on {used} images from {source}"
    return report
