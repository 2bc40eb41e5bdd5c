"""Tower surgery on UNWRAPPED open_clip models/towers: patch masking and intermediate-layer tokens, in one forward.

Everything happens inside one forward call, so a DDP-wrapped module (`StudentModel`) gets its gradients synced:

    feats, tokens = encode_image_with_options(model.visual, image, mask_ratio=0.5, layers=[0, -1])
    feats_t, tokens_t = encode_text_with_options(model, text, layers=[-1])

or `forward_features(model, image, text, ...)` for both towers at once.

- Masking (the mfd term): per-sample random subset of (1 − r) of the patch tokens (the class token is always kept),
  applied through the ViT's own patch-dropout hook point (`visual.patch_dropout`, open_clip/transformer.py) during
  this call only, whatever the module's train/eval mode. Only open_clip VisionTransformer image towers can be masked;
  timm towers (TimmModel) and ModifiedResNet raise a DistillSpecError naming the tower.
- Intermediate tokens (the feat term): block outputs of the ViT/text transformer (`forward_intermediates`) or the
  stages of a timm trunk / ModifiedResNet, taken after the tower's final norm (ln_post, ln_final, timm's final norm),
  as [B, N, C] (ViT: patch tokens without the class token; CNN maps flattened from [B, C, H, W]).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer

from ..errors import DistillSpecError


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
                "DistributedDataParallel", "DataParallel"):
            model = model.module
        else:
            return model


def describe_tower(tower: nn.Module) -> str:
    if isinstance(tower, TimmModel):
        trunk = tower.trunk
        name = getattr(trunk, "default_cfg", {}).get("architecture") or type(trunk).__name__
        return f"TimmModel (timm '{name}')"
    if isinstance(tower, ModifiedResNet):
        return "ModifiedResNet (open_clip's CLIP ResNet)"
    return type(tower).__name__


# ---- masking ------------------------------------------------------------------------------------------------

def num_kept(num_patches: int, mask_ratio: float) -> int:
    return max(1, math.floor(num_patches * (1.0 - mask_ratio) + 1e-6))


_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors: the same bits on every device and process."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32  # int64 products may wrap; the low 32 bits stay exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def mask_keys(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """One mask key per sample from (seed, step, position in the global batch) [B] int64: masks differ across the
    samples of a global batch and do not depend on how it is split over processes or micro-batches."""
    base = _mix32(_mix32(torch.tensor(seed, dtype=torch.int64)) ^ (step & _U32))
    return _mix32(base.to(positions.device) ^ positions.to(torch.int64))


def _keyed_order(keys: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of 0..n-1 per key [B, n], a pure function of the key."""
    patch = torch.arange(n, device=keys.device, dtype=torch.int64)
    noise = _mix32(keys.to(torch.int64)[:, None] ^ _mix32(patch + 0x9E3779B9)[None, :])
    shift = max(12, n.bit_length())
    return ((noise << shift) | patch).argsort(dim=1)  # the patch index breaks ties


def mask_tokens(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                exclude_first_token: bool = True, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Keep a per-sample random subset of (1 − r) of the tokens of x [B, N, C] (the first, class token always kept),
    in their original order. With `keys` ([B] int64, see mask_keys) the subset is a function of each sample's key;
    otherwise it is drawn from `generator` (or the global RNG)."""
    prefix, patches = (x[:, :1], x[:, 1:]) if exclude_first_token else (x[:, :0], x)
    b, n, c = patches.shape
    keep = num_kept(n, mask_ratio)
    if keys is not None:
        order = _keyed_order(keys.to(x.device), n)
    else:
        gen_device = generator.device if generator is not None else x.device
        order = torch.rand(b, n, generator=generator, device=gen_device).to(x.device).argsort(dim=1)
    idx = order[:, :keep].sort(dim=1).values
    kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
    return torch.cat([prefix, kept], dim=1)


class TokenMask(nn.Module):
    """Drop-in for open_clip's PatchDropout that always masks (train or eval) with a per-sample random subset."""

    def __init__(self, mask_ratio: float, generator: torch.Generator | None = None, keys: torch.Tensor | None = None):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise DistillSpecError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.generator = generator
        self.keys = keys

    def forward(self, x):
        return mask_tokens(x, self.mask_ratio, self.generator, keys=self.keys) if self.mask_ratio > 0 else x


@contextlib.contextmanager
def _patch_dropout(visual: VisionTransformer, module: nn.Module):
    saved = visual.patch_dropout
    visual._modules["patch_dropout"] = module
    try:
        yield
    finally:
        visual._modules["patch_dropout"] = saved


def check_masking_supported(visual: nn.Module) -> None:
    """Raise DistillSpecError unless the image tower can run the masked (mfd) forward."""
    visual = unwrap(visual)
    if not isinstance(visual, VisionTransformer):
        raise DistillSpecError(f"mfd (masked feature distillation) needs a ViT student image tower (open_clip "
                               f"VisionTransformer); this student's image tower is {describe_tower(visual)}")



# ---- layer bookkeeping ----------------------------------------------------------------------------------------

def _text_transformer(model: nn.Module):
    """(transformer blocks holder, kind) of a CLIP / CustomTextCLIP text tower, or raise."""
    model = unwrap(model)
    if isinstance(getattr(model, "text", None), TextTransformer):
        return model.text.transformer
    if hasattr(model, "transformer") and hasattr(model, "token_embedding") and hasattr(model.transformer, "resblocks"):
        return model.transformer
    text = getattr(model, "text", model)
    raise DistillSpecError(f"feat: intermediate text tokens need an open_clip text transformer; got {type(text).__name__}")


def tower_widths(model: nn.Module, tower: str) -> list[int]:
    """Token width of every intermediate index of a tower ('image': `model.visual` or a tower itself; 'text')."""
    model = unwrap(model)
    if tower == "text":
        tr = _text_transformer(model)
        return [tr.width] * len(tr.resblocks)
    visual = getattr(model, "visual", model)
    if isinstance(visual, VisionTransformer):
        return [visual.transformer.width] * len(visual.transformer.resblocks)
    if isinstance(visual, TimmModel):
        return [int(f["num_chs"]) for f in visual.trunk.feature_info]
    if isinstance(visual, ModifiedResNet):
        return [visual.bn3.num_features] + [getattr(visual, f"layer{i}")[-1].bn3.num_features for i in range(1, 5)]
    raise DistillSpecError(f"feat: intermediate image tokens are supported for VisionTransformer, TimmModel and "
                           f"ModifiedResNet towers; got {describe_tower(visual)}")


def layer_index(i: int, depth: int, what: str) -> int:
    j = i + depth if i < 0 else i
    if not 0 <= j < depth:
        raise DistillSpecError(f"feat: layer {i} out of range for the {what} ({depth} layers: 0..{depth - 1})")
    return j



def _select(layers: Sequence[int], depth: int, what: str) -> tuple[list[int], list[int]]:
    wanted = [layer_index(int(i), depth, what) for i in layers]
    return wanted, sorted(set(wanted))


def _nlc(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


# ---- forwards ---------------------------------------------------------------------------------------------------

def _vit_forward(visual: VisionTransformer, image, mask_ratio, layers, generator, mask_keys=None):
    if mask_ratio > 0:
        with _patch_dropout(visual, TokenMask(mask_ratio, generator, mask_keys)):
            x = visual._embeds(image)
    else:
        x = visual._embeds(image)
    tokens = []
    if layers:
        wanted, uniq = _select(layers, len(visual.transformer.resblocks), "student image tower")
        x, inter = visual.transformer.forward_intermediates(x, indices=uniq)
        norm = visual.ln_post if visual.attn_pool is None else nn.Identity()
        by_index = {i: norm(t)[:, 1:] for i, t in zip(uniq, inter)}
        tokens = [by_index[i] for i in wanted]
    else:
        x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens


def _modified_resnet_forward(visual: ModifiedResNet, image, layers):
    wanted, uniq = _select(layers, 5, "ModifiedResNet")
    x, by_index = image.type(visual.conv1.weight.dtype), {}
    for i, block in enumerate([visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4]):
        x = block(x)
        if i in uniq:
            by_index[i] = _nlc(x)
    return visual.attnpool(x), [by_index[i] for i in wanted]


def encode_image_with_options(visual: nn.Module, image: torch.Tensor, mask_ratio: float = 0.0,
                              layers: Sequence[int] | None = None, generator: torch.Generator | None = None,
                              mask_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(raw image features [B, D], intermediate tokens [[B, N, C] per entry of `layers`]) in ONE forward.

    mask_ratio > 0: per-sample random patch masking (ViT only). layers: block/stage indices (negative from the end)."""
    visual = unwrap(visual)
    layers = list(layers) if layers else []
    if mask_ratio > 0:
        check_masking_supported(visual)
        if layers:
            raise DistillSpecError("feat tokens need the unmasked image: take intermediates from a forward with "
                                   "mask_ratio=0 (pass the masked features as student_image_masked)")
    if isinstance(visual, VisionTransformer):
        if mask_ratio == 0 and not layers:
            out = visual(image)
            return (out[0] if isinstance(out, tuple) else out), []
        return _vit_forward(visual, image, mask_ratio, layers, generator, mask_keys)
    if not layers:
        return visual(image), []
    if isinstance(visual, TimmModel):
        wanted, uniq = _select(layers, len(visual.trunk.feature_info), "timm image tower")
        out = visual.forward_intermediates(image, indices=uniq, normalize_intermediates=True)
        by_index = {i: _nlc(t) for i, t in zip(uniq, out["image_intermediates"])}
        return out["image_features"], [by_index[i] for i in wanted]
    if isinstance(visual, ModifiedResNet):
        return _modified_resnet_forward(visual, image, layers)
    tower_widths(visual, "image")  # raises the clear unsupported-tower error
    raise AssertionError("unreachable")


def encode_text_with_options(model: nn.Module, text: torch.Tensor, layers: Sequence[int] | None = None
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(raw text features [B, D], intermediate tokens [B, L, C] after ln_final per entry of `layers`)."""
    model = unwrap(model)
    if not layers:
        return model.encode_text(text), []
    tr = _text_transformer(model)
    wanted, uniq = _select(layers, len(tr.resblocks), "student text tower")
    if isinstance(getattr(model, "text", None), TextTransformer):
        out = model.text.forward_intermediates(text, indices=uniq, normalize_intermediates=True, output_fmt="NLC")
    else:
        out = model.forward_intermediates(text=text, text_indices=uniq, normalize=False,
                                          normalize_intermediates=True)
    by_index = dict(zip(uniq, out["text_intermediates"]))
    return out["text_features"], [by_index[i] for i in wanted]


def forward_features(model: nn.Module, image: torch.Tensor | None, text: torch.Tensor | None,
                     mask_ratio: float = 0.0, image_layers: Sequence[int] | None = None,
                     text_layers: Sequence[int] | None = None, generator: torch.Generator | None = None,
                     mask_keys: torch.Tensor | None = None) -> dict:
    """One forward of a CLIP model: raw features, logit scale and the requested intermediates.

    Returns {"image_features", "text_features", "logit_scale" (exp'd), "image_intermediates", "text_intermediates"},
    and "logit_bias" for a model that has one (open_clip SigLIP models)."""
    model = unwrap(model)
    out: dict = {"logit_scale": model.logit_scale.exp()}
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias
    if image is not None:
        out["image_features"], out["image_intermediates"] = encode_image_with_options(
            model.visual, image, mask_ratio, image_layers, generator, mask_keys)
    if text is not None:
        out["text_features"], out["text_intermediates"] = encode_text_with_options(model, text, text_layers)
    return out


def embed_dim(model: nn.Module) -> int:
    """Output width of an open_clip model (one tiny text forward: every architecture answers it the same way)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = torch.zeros(1, int(getattr(model, "context_length", 77)), dtype=torch.long, device=device)
        return int(model.encode_text(tokens).shape[-1])
