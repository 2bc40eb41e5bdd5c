"""The frozen teacher, one model or an ensemble, and how its forward is made cheap once at start-up.

It never changes, so `Teacher.prepare` readies it once: weights in the low precision of --precision (`teacher_dtype`),
an optional torch.compile of the forward (--teacher-compile, static shapes), and only the towers the active loss
terms read (`set_outputs`, from `DistillLoss.teacher_towers`). Every forward runs under `torch.inference_mode`; the
outputs handed to the losses are fp32 copies (inference tensors cannot be saved for backward).

What freezes it is that forward: inference_mode, eval mode kept by `train`, and no optimizer or engine ever given its
parameters. The parameters themselves keep requires_grad=True, because torch's matmul folds a 3-D activation into one
mm only against a weight that requires grad; against a frozen one, nn.MultiheadAttention's transposed activations go
to a bmm with the weight expanded and copied once per position (in bf16 on CPU a ViT-B-32 teacher's forward is 3.8x
slower, almost all of it in the text tower's in-projection; the outputs are bit-identical either way).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .towers import embed_dim, forward_features

TOWERS = ("image", "text")


def teacher_dtype(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype of the frozen teacher's matmul weights for the student's --precision (None: fp32).

    bf16 / amp_bf16: bf16. amp: bf16 where the device has it (CPUs, CUDA from Ampere), else fp16 (older CUDA):
    the teacher needs no loss scaling, so bf16's range is preferred to the student's fp16. fp32: fp32."""
    if precision in ("bf16", "amp_bf16"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "amp":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return None


def to_low_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """open_clip's cast of a model to low precision (its precision="bf16"): conv/linear/attention weights and the
    projections; norms, the embeddings and the logit scale stay fp32. open_clip then runs the residual stream in that
    dtype too, so outputs differ from fp32 weights under autocast by bf16 rounding (~1e-3 on unit embeddings)."""
    from open_clip.model import convert_weights_to_lp

    convert_weights_to_lp(model, dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy made outside inference mode: a normal tensor the losses may save for backward."""
    return t.to(torch.float32, copy=True)


class Teacher(nn.Module):
    """A frozen teacher (or an ensemble of them): eval mode, inference_mode forwards, never given to an optimizer or
    wrapped in DDP."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.intermediate_layers: dict[str, list[int]] = {}
        self.intermediate_member = 0
        self.towers = frozenset(TOWERS)  # the towers whose embeddings a forward returns (set_outputs)
        self.compute_dtype: torch.dtype | None = None  # low-precision weights and autocast (prepare)
        self._features = self._member_features  # torch.compile'd by prepare(compile=True)
        self.requires_grad_(True)  # matmul's fast fold (module docstring); inference_mode is what freezes it
        self.eval()

    def train(self, mode: bool = True):  # a frozen teacher stays in eval mode whatever the trainer does
        return super().train(False)

    @property
    def embed_dims(self) -> list[int]:
        return [embed_dim(m) for m in self.members]

    @property
    def logit_biases(self) -> list[float | None]:
        """Each member's logit bias (SigLIP teachers), None for a member without one (CLIP)."""
        return [None if getattr(m, "logit_bias", None) is None else float(m.logit_bias.detach()) for m in self.members]

    def set_intermediate_layers(self, layers: dict[str, list[int]], member: int = 0) -> None:
        """Ask `member` for these layers' tokens ({"image": [...], "text": [...]}) on every forward (feat term)."""
        self.intermediate_layers, self.intermediate_member = layers, member

    def set_outputs(self, towers) -> None:
        """Return (and compute) only these towers' embeddings ("image", "text"); a tower whose intermediate tokens
        were asked for (set_intermediate_layers) still runs."""
        unknown = set(towers) - set(TOWERS)
        if unknown:
            raise ValueError(f"unknown teacher tower(s) {sorted(unknown)}: choose from {TOWERS}")
        self.towers = frozenset(towers)

    def prepare(self, dtype: torch.dtype | None = None, compile: bool = False) -> None:
        """Once at start-up: weights to `dtype` (see teacher_dtype; the forward then autocasts to it) and, with
        `compile`, torch.compile of the members' forward with static shapes."""
        if dtype is not None:
            for member in self.members:
                to_low_precision(member, dtype)
            self.compute_dtype = dtype
        if compile:
            self._features = compile_forward(self._member_features)

    @property
    def runs_towers(self) -> list[str]:
        return [tower for tower in TOWERS if self.runs(tower)]

    def runs(self, tower: str) -> bool:
        """Whether a forward runs this tower (its embeddings are read, or its intermediate tokens are)."""
        return tower in self.towers or bool(self.intermediate_layers.get(tower))

    def _member_features(self, image: torch.Tensor | None, text: torch.Tensor | None) -> list[dict]:
        layers = self.intermediate_layers
        out = []
        for i, member in enumerate(self.members):
            wanted = layers if i == self.intermediate_member else {}
            out.append(forward_features(member, image, text, image_layers=wanted.get("image"),
                                        text_layers=wanted.get("text")))
        return out

    def forward(self, image: torch.Tensor, text: torch.Tensor | None) -> dict[str, list[torch.Tensor] | None]:
        """Per member: L2-normalised features of the towers read (`text` may be None when the text tower is not:
        image-only students), exp(logit scale) and logit bias, in fp32."""
        device = image.device
        image = image if self.runs("image") else None
        text = text if self.runs("text") else None
        with torch.inference_mode():
            if self.compute_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=self.compute_dtype):
                    feats = self._features(image, text)
            else:
                feats = self._features(image, text)
        out: dict = {"image_features": [] if "image" in self.towers else None,
                     "text_features": [] if "text" in self.towers else None, "logit_scales": [], "logit_biases": []}
        for i, f in enumerate(feats):
            for tower in TOWERS:
                if tower in self.towers:
                    out[f"{tower}_features"].append(nn.functional.normalize(_fp32(f[f"{tower}_features"]), dim=-1))
            out["logit_scales"].append(_fp32(f["logit_scale"]))
            out["logit_biases"].append(_fp32(f["logit_bias"]) if "logit_bias" in f else None)
            if i == self.intermediate_member and self.intermediate_layers:
                out["intermediates"] = {tower: [_fp32(t) for t in f.get(f"{tower}_intermediates", [])]
                                        for tower in TOWERS}
        return out


def compile_forward(fn):
    """torch.compile with static shapes (the teacher sees one batch shape); a clean error where it is unavailable."""
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        raise UsageError(f"--teacher-compile needs torch.compile (torch >= 2.0); this torch is {torch.__version__}")
    try:
        compiled = compile_fn(fn, dynamic=False)
    except RuntimeError as e:  # e.g. "Dynamo is not supported on Python 3.x"
        raise UsageError(f"--teacher-compile: torch.compile is unavailable here: {e}") from None

    def run(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # the compile happens on the first call
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--teacher-compile: torch.compile failed ({first}); train without it") from None

    return run
