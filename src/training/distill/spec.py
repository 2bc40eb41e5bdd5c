"""The `--distill` spec language: term names, weights, weight schedules, presets (`--recipe`), feat layer pairs.

Grammar (comma separated, whitespace ignored)::

    spec  := item ("," item)*
    item  := term ["=" weight ["@" sched]]          a bare term means weight 1
    sched := "warmup:" a ":" b                      linear ramp 0 -> weight between steps a and b
           | "warmup:" b                            same as warmup:0:b
           | "from:" k                              0 before step k, weight from step k on

Nothing here builds a model, so the trainer validates the flags before any model loads. The term names and what
each term needs come from the registry (registry.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import DistillSpecError
from .registry import REGISTRY, needs

TERMS: dict[str, str] = {name: term.description for name, term in REGISTRY.items()}  # in registration order
VALID_TERMS = tuple(TERMS)
EMB_METRICS = ("mse", "l1", "smooth_l1", "cosine")
SYNTAX = "term=weight[@warmup:a:b|@from:k],... (e.g. \"task=1,crd=1,icl=1,fd=2000@warmup:0:5000\")"


class SpecError(DistillSpecError):
    """A bad --distill spec, recipe or distillation option; the one line lists the valid terms.

    A UsageError, so every entry point (training, cache building, evaluation) prints it as one line, exit 2."""

    def __init__(self, message: str):
        super().__init__(f"{' '.join(str(message).split())} (valid terms: {', '.join(VALID_TERMS)})")


@dataclass(frozen=True)
class WeightSchedule:
    """weight(step): constant, linear warm-up from step `start` to `end`, or a step on at `start`."""

    value: float
    kind: str = "const"  # const | warmup | from
    start: int = 0
    end: int = 0

    def __call__(self, step: int) -> float:
        if self.kind == "warmup":
            if step <= self.start:
                return 0.0
            if step >= self.end:
                return self.value
            return self.value * (step - self.start) / (self.end - self.start)
        if self.kind == "from":
            return self.value if step >= self.start else 0.0
        return self.value

    @property
    def active(self) -> bool:
        """True when the weight is non-zero at some step (the term's parameters must exist)."""
        return self.value != 0.0

    def __str__(self) -> str:
        v = f"{self.value:g}"
        if self.kind == "warmup":
            return f"{v}@warmup:{self.start}:{self.end}"
        if self.kind == "from":
            return f"{v}@from:{self.start}"
        return v


@dataclass(frozen=True)
class FeatPair:
    """One `feat` layer pair: tower 'image' or 'text', block indices and token widths on both sides."""

    tower: str
    student_layer: int
    teacher_layer: int
    student_width: int
    teacher_width: int


@dataclass
class ResolvedSpec:
    terms: dict[str, WeightSchedule]
    options: dict = field(default_factory=dict)  # preset defaults (teacher_logit_scale, crd_soft_ce, ...)
    source: str = ""

    def __str__(self) -> str:
        return format_spec(self.terms)

    @property
    def active(self) -> list[str]:
        """The terms with a non-zero weight at some step (those that exist in the loss)."""
        return [name for name, sched in self.terms.items() if sched.active]

    def needs(self, what: str) -> bool:
        """Whether an active term declares `what` in its registration ("teacher", "teacher_internals", ...)."""
        return needs(self.active, what)


def format_spec(terms: dict[str, WeightSchedule]) -> str:
    return ",".join(f"{name}={sched}" for name, sched in terms.items())


def _parse_int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"bad step '{text}' in {what} of spec '{spec}': expected an integer; syntax {SYNTAX}") from None
    if value < 0:
        raise SpecError(f"bad step '{text}' in {what} of spec '{spec}': steps must be >= 0")
    return value


def _parse_weight(text: str, term: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"bad weight '{text}' for term '{term}' in spec '{spec}'; syntax {SYNTAX}") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"bad weight '{text}' for term '{term}' in spec '{spec}': must be finite and >= 0")
    return value


def parse_schedule(text: str, term: str = "?", spec: str | None = None) -> WeightSchedule:
    """Parse "2000", "2000@warmup:0:5000", "2000@warmup:5000" or "1@from:3000"."""
    spec = text if spec is None else spec
    weight_text, _, sched = text.partition("@")
    value = _parse_weight(weight_text.strip(), term, spec)
    if not _:
        return WeightSchedule(value)
    kind, _, args = sched.strip().partition(":")
    parts = [p.strip() for p in args.split(":")] if args else []
    what = f"schedule '@{sched}' of term '{term}'"
    if kind == "warmup" and len(parts) in (1, 2):
        steps = [_parse_int(p, what, spec) for p in parts]
        start, end = (0, steps[0]) if len(steps) == 1 else steps
        if end <= start:
            raise SpecError(f"bad {what} in spec '{spec}': warmup:a:b needs a < b")
        return WeightSchedule(value, "warmup", start, end)
    if kind == "from" and len(parts) == 1:
        return WeightSchedule(value, "from", _parse_int(parts[0], what, spec))
    raise SpecError(f"bad {what} in spec '{spec}': expected @warmup:a:b or @from:k; syntax {SYNTAX}")


def parse_spec(spec: str) -> dict[str, WeightSchedule]:
    """'task=1,crd=1,icl=1,fd=2000' -> {term: WeightSchedule}; raises DistillSpecError on any problem."""
    if spec is None or not str(spec).strip():
        raise SpecError(f"empty distillation spec; syntax {SYNTAX}")
    terms: dict[str, WeightSchedule] = {}
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            raise SpecError(f"empty item in spec '{spec}'; syntax {SYNTAX}")
        name, eq, rest = item.partition("=")
        name = name.strip()
        if name not in TERMS:
            raise SpecError(f"unknown distillation term '{name}' in spec '{spec}'")
        if name in terms:
            raise SpecError(f"term '{name}' appears twice in spec '{spec}'")
        if eq and not rest.strip():
            raise SpecError(f"missing weight for term '{name}' in spec '{spec}'; syntax {SYNTAX}")
        terms[name] = parse_schedule(rest.strip(), name, spec) if eq else WeightSchedule(1.0)
    return terms


# ---- presets ----------------------------------------------------------------------------------------------

# name -> (spec, option defaults). Option defaults apply only where the user left the flag unset.
PRESETS: dict[str, tuple[str, dict]] = {
    # CLIP-KD (Yang et al., CVPR 2024): the paper's best combination
    "clip-kd": ("task=1,crd=1,icl=1,fd=2000", {}),
    # TinyCLIP affinity mimicking: crd only, both distributions at a fixed scale 50, no task loss
    "tinyclip": ("crd=1", {"teacher_logit_scale": 50.0, "student_kd_logit_scale": 50.0}),
    # MobileCLIP: (1-lambda)*task + lambda*crd over a teacher ensemble (softmax targets averaged);
    # lambda = 1 as in ml-mobileclip's DataCompDR runs; "mobileclip:0.7" picks another lambda
    "mobileclip": ("task=0,crd=1", {}),
    # DistillCLIP (Ramos 2023): similarity-map distillation only
    "distillclip": ("sim=1", {}),
    # open_clip's DistillClipLoss: task + distillation written as soft-target cross-entropy
    "open_clip": ("task=1,crd=1", {"crd_soft_ce": True}),
    # NVIDIA clip-distillation: image embedding regression
    "nvidia": ("emb=1", {}),
    "none": ("task=1", {}),
}


def preset(recipe: str) -> tuple[str, dict]:
    """Spec and option defaults of a --recipe (accepts "mobileclip:LAMBDA")."""
    name, _, arg = str(recipe).strip().partition(":")
    if name not in PRESETS:
        raise SpecError(f"unknown --recipe '{recipe}' (recipes: {', '.join(PRESETS)})")
    spec, options = PRESETS[name]
    if arg:
        if name != "mobileclip":
            raise SpecError(f"--recipe '{recipe}': only mobileclip takes an argument (mobileclip:LAMBDA)")
        try:
            lam = float(arg)
        except ValueError:
            lam = float("nan")
        if not 0.0 <= lam <= 1.0:
            raise SpecError(f"--recipe '{recipe}': LAMBDA must be a number in [0, 1]")
        spec = f"task={1.0 - lam:g},crd={lam:g}"
    return spec, dict(options)


def resolve_spec(distill: str | None = None, recipe: str | None = None,
                 overrides: dict[str, float] | None = None) -> ResolvedSpec:
    """Spec in force: an explicit --distill wins over --recipe; with neither, "task=1". Then the alias weights
    (`overrides`, CLIP-KD's --alpha_*_loss flags) replace the weights of their terms."""
    options: dict = {}
    if distill is not None and str(distill).strip():
        text, source = str(distill), "--distill"
    elif recipe:
        text, options = preset(recipe)
        source = f"--recipe {recipe}"
    else:
        text, source = "task=1", "default"
    terms = parse_spec(text)
    for name, weight in (overrides or {}).items():
        if name not in TERMS:
            raise SpecError(f"unknown distillation term '{name}' in the alias-flag overrides")
        terms[name] = WeightSchedule(_parse_weight(str(weight), name, f"{name}={weight}"))
    if not any(s.active for s in terms.values()):
        raise SpecError(f"every term of '{format_spec(terms)}' has weight 0: nothing to optimise")
    return ResolvedSpec(terms=terms, options=options, source=source)


def parse_member_values(text: str | None, flag: str) -> list[float] | None:
    """'70,60' -> [70.0, 60.0]: one value per teacher ensemble member (--teacher-logit-scales/-biases)."""
    if text is None or not str(text).strip():
        return None
    try:
        values = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise SpecError(f"bad {flag} '{text}': expected comma-separated numbers, one per --teacher member") from None
    if not all(math.isfinite(v) for v in values):
        raise SpecError(f"bad {flag} '{text}': values must be finite")
    return values


def parse_feat_layers(text: str | None) -> dict[str, list[tuple[int, int]]] | None:
    """'--feat-layers' -> {tower: [(student_layer, teacher_layer), ...]}.

    "s:t,..." pairs apply to both towers; "image:s:t" / "text:s:t" (or "v:s:t" / "t:s:t") to one tower.
    Negative indices count from the last block. None/empty -> None (evenly spaced defaults).
    """
    if text is None or not str(text).strip():
        return None
    out: dict[str, list[tuple[int, int]]] = {}
    aliases = {"image": "image", "v": "image", "visual": "image", "text": "text", "t": "text"}
    for item in str(text).split(","):
        parts = [p.strip() for p in item.strip().split(":")]
        towers = ["image", "text"]
        if len(parts) == 3 and parts[0] in aliases:
            towers, parts = [aliases[parts[0]]], parts[1:]
        if len(parts) != 2:
            raise SpecError(f"bad --feat-layers item '{item}' in '{text}': expected s:t or image:s:t / text:s:t")
        try:
            pair = (int(parts[0]), int(parts[1]))
        except ValueError:
            raise SpecError(f"bad --feat-layers item '{item}' in '{text}': layer indices must be integers") from None
        for tower in towers:
            out.setdefault(tower, []).append(pair)
    return out


def check_combinations(terms: dict[str, WeightSchedule], feat_layers: str | None = None) -> None:
    """Refuse, before any model is built, term combinations the trainer cannot run (they would fail at step 1)."""
    towers = parse_feat_layers(feat_layers)  # a bad --feat-layers fails at start-up too
    active = [name for name, sched in terms.items() if sched.active]
    # a masked-view term (mfd) masks the student's one image forward (from step 0, whatever its schedule); the
    # intermediate tokens (feat) of the image must come from the unmasked image. The default feat pairs cover both
    # towers.
    masked = [n for n in active if REGISTRY[n].masked_view]
    tokens = [n for n in active if REGISTRY[n].intermediates]
    if masked and tokens and (towers is None or "image" in towers):
        raise SpecError(f"{masked[0]} and {tokens[0]} cannot share the student image forward: {masked[0]} masks it "
                        f"and {tokens[0]} needs the unmasked image tokens; distil text tokens only (--feat-layers "
                        "text:s:t,...) or drop one of the two terms")
