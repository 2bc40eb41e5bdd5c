"""Model loading for evaluation: open_clip name or JSON config + a pretrained tag, a weights file, or a training
checkpoint (`{"model": student_state_dict, ...}`), always with weights_only=True.

Name resolution and weight loading are `training.models`' (one implementation for training and evaluation).
"""

from __future__ import annotations

import hashlib
import os

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..models import create_clip
from ..models.weights import is_local_path


def model_id(arch: str, pretrained: str | None) -> str:
    """Stable id for caches: arch + tag, or arch + absolute checkpoint path + mtime + size."""
    if is_local_path(pretrained) and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        raw = f"{arch}|{os.path.abspath(pretrained)}|{st.st_mtime_ns}|{st.st_size}"
    else:
        raw = f"{arch}|{pretrained or 'random-init'}"
    return f"{arch}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"


def load_model(arch: str, pretrained: str | None, device: torch.device):
    """(model in eval mode on device, preprocess_val, tokenizer, open_clip name): built as training builds models
    (`models.create_clip`), with open_clip's validation transform for the model's preprocessing config. A file
    holding an image-only student (models/image_student.py) gives that student, its own transform and no
    tokenizer."""
    from ..data.transforms import EvalTransform
    from ..models.image_student import load_image_student

    student = load_image_student(pretrained) if is_local_path(pretrained) else None
    if student is not None:  # an image-only student or classifier: no text tower, its own class head
        return student.to(device).eval(), EvalTransform(student.image_format), None, student.arch
    model = create_clip(arch, pretrained, torch.device("cpu"))
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(model.arch_name), model.arch_name
