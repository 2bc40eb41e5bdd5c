"""The cheap frozen teacher (models/teacher.py): inference mode, low-precision weights, only the towers the active
terms read, and --teacher-compile, each checked against the plain fp32 eager teacher."""

import copy

import pytest
import torch

import training  # noqa: F401
from training.config import Config, DistillConfig, RuntimeConfig, TeacherConfig
from training.distill import create_distill_loss
from training.distill.registry import REGISTRY, teacher_towers
from training.models import Teacher, create_clip
from training.models.teacher import teacher_dtype
from training.student_kinds import student_kind
from training.trainer import prepare_teacher, student_forward_module

CPU = torch.device("cpu")
B = 4


def _models():
    torch.manual_seed(0)
    student = create_clip("tiny-student", None, CPU)
    torch.manual_seed(1)
    return student, create_clip("tiny-teacher", None, CPU)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 400, (B, 32), generator=g)
    return torch.randn(B, 3, 64, 64, generator=g), tokens[:, :24], tokens  # student (24) and teacher (32) tokens


def _config(spec: str, precision: str = "fp32", compile: bool = False, **distill) -> Config:
    return Config(teacher=TeacherConfig(teacher="tiny-teacher", teacher_compile=compile),
                  distill=DistillConfig(distill=spec, **distill), runtime=RuntimeConfig(precision=precision))


def _setup(spec: str, precision: str = "fp32", prepared: bool = True, compile: bool = False, **distill):
    """(student forward, teacher, loss) wired as the trainer wires them."""
    student, member = _models()
    config = _config(spec, precision, compile, **distill)
    teacher = Teacher([member])
    loss = create_distill_loss(config.distill, 64, teacher.embed_dims, seed=0, student_model=student,
                               teacher_model=[member])
    forward = student_forward_module(student, loss, teacher, config.distill, CPU)
    if prepared:
        prepare_teacher(teacher, loss, config, CPU)
    return forward, teacher, loss


def _losses(forward, teacher, loss, autocast_dtype=None):
    image, text, teacher_text = _batch()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        t = teacher(image, teacher_text)
        s = forward(image, text)
        return loss(**student_kind("clip").loss_inputs(s, t, {}, 0, CPU)), t


def test_teacher_dtype_follows_precision(monkeypatch):
    assert teacher_dtype("fp32", CPU) is None
    assert teacher_dtype("bf16", CPU) is torch.bfloat16
    assert teacher_dtype("amp_bf16", CPU) is torch.bfloat16
    assert teacher_dtype("amp", CPU) is torch.bfloat16  # CPU autocast is bf16
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert teacher_dtype("amp", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. V100
    assert teacher_dtype("amp", cuda) is torch.float16


def test_outputs_are_fp32_normal_tensors_after_inference_mode():
    forward, teacher, loss = _setup("crd=1,fd=1", precision="amp_bf16")
    assert teacher.compute_dtype is torch.bfloat16
    member = teacher.members[0]
    assert member.visual.conv1.weight.dtype is torch.bfloat16 and member.ln_final.weight.dtype is torch.float32
    _, t = _losses(forward, teacher, loss, torch.bfloat16)
    for x in [*t["image_features"], *t["text_features"], *t["logit_scales"]]:
        assert x.dtype is torch.float32 and not x.is_inference() and not x.requires_grad


def test_low_precision_weights_match_fp32_weights_under_the_same_autocast():
    """The teacher's bf16 weights give, within bf16 rounding, the embeddings its fp32 weights give under the bf16
    autocast the student trains in (and stay close to the fp32 teacher); norms and embeddings stay fp32."""
    image, _, text = _batch()
    _, member = _models()
    reference = Teacher([copy.deepcopy(member)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(image, text)
    plain = reference(image, text)
    fast = Teacher([member])
    fast.prepare(torch.bfloat16)
    got = fast(image, text)
    for key in ("image_features", "text_features"):
        autocast_error = (want[key][0] - plain[key][0]).abs().max()
        assert (got[key][0] - want[key][0]).abs().max() < 1e-2
        assert (got[key][0] - plain[key][0]).abs().max() < max(2 * autocast_error, 1e-2)
        assert not torch.equal(got[key][0], plain[key][0])  # it really ran in bf16


_ALL_TEACHER_TERMS = [n for n, t in REGISTRY.items() if t.teacher]


@pytest.mark.parametrize("term", _ALL_TEACHER_TERMS)
def test_every_term_trains_from_the_prepared_online_teacher(term):
    """Each teacher-reading term, fed by the inference-mode low-precision teacher, backpropagates into the student;
    its value matches the one an unprepared fp32 teacher (no_grad, all towers) gives within bf16 tolerance."""
    extra = {"feat_layers": "image:-1:-1,text:-1:-1"} if term == "feat" else {}
    if REGISTRY[term].teacher_bias:
        extra["teacher_logit_biases"] = "-10"
    spec = f"task=1,{term}=1"
    forward, teacher, loss = _setup(spec, precision="amp_bf16", **extra)
    losses, _ = _losses(forward, teacher, loss, torch.bfloat16)
    losses["total"].backward()
    grads = [p.grad for p in forward.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    ref_forward, ref_teacher, ref_loss = _setup(spec, prepared=False, **extra)
    ref, _ = _losses(ref_forward, ref_teacher, ref_loss, torch.bfloat16)
    torch.testing.assert_close(losses[term].float(), ref[term].float(), atol=5e-2, rtol=5e-2)


def test_towers_read_come_from_the_registry():
    assert teacher_towers(["task"]) == frozenset()
    assert teacher_towers(["emb"]) == {"image"}
    assert teacher_towers(["emb_text"]) == {"text"}
    assert teacher_towers(["feat"]) == frozenset()
    assert teacher_towers(["crd", "emb"]) == {"image", "text"}


class _Counting:
    """Counts the teacher's image-tower forwards and text encodes."""

    def __init__(self, model):
        self.calls = {"image": 0, "text": 0}
        encode_text = model.encode_text

        def text(*args, **kwargs):
            self.calls["text"] += 1
            return encode_text(*args, **kwargs)

        model.encode_text = text
        model.visual.register_forward_pre_hook(lambda *_: self.calls.__setitem__("image", self.calls["image"] + 1))


@pytest.mark.parametrize("spec,runs", [("task=1,emb=1", {"image": 1, "text": 0}),
                                       ("task=1,emb_text=1", {"image": 0, "text": 1}),
                                       ("task=1,crd=1", {"image": 1, "text": 1})])
def test_unread_teacher_towers_are_not_computed_and_losses_are_unchanged(spec, runs):
    forward, teacher, loss = _setup(spec)
    counter = _Counting(teacher.members[0])
    losses, t = _losses(forward, teacher, loss)
    assert counter.calls == runs
    for tower in ("image", "text"):
        assert (t[f"{tower}_features"] is None) == (runs[tower] == 0)

    full_forward, full_teacher, full_loss = _setup(spec, prepared=False)  # every tower, as before
    full, _ = _losses(full_forward, full_teacher, full_loss)
    for k in losses:
        torch.testing.assert_close(losses[k], full[k], atol=0, rtol=0)


def test_feat_on_text_tokens_skips_the_teacher_image_tower():
    forward, teacher, loss = _setup("task=1,feat=1", feat_layers="text:-1:-1")
    counter = _Counting(teacher.members[0])
    _, t = _losses(forward, teacher, loss)
    assert counter.calls["image"] == 0 and t["intermediates"]["text"]


def test_compile_is_refused_without_a_live_teacher():
    from training.errors import UsageError

    config = _config("task=1,fd=1", compile=True)
    with pytest.raises(UsageError, match="--teacher-compile"):
        prepare_teacher(None, None, config, CPU)


@pytest.mark.slow
def test_compiled_teacher_matches_eager():
    """--teacher-compile: torch.compile (inductor, static shapes) gives the eager teacher's outputs."""
    pytest.importorskip("torch._inductor")
    forward, teacher, loss = _setup("task=1,crd=1,fd=1")
    _, eager = _losses(forward, teacher, loss)
    teacher.prepare(compile=True)
    for _ in range(2):  # the second call reuses the compiled graph (static shapes: no recompile)
        _, compiled = _losses(forward, teacher, loss)
    for key in ("image_features", "text_features", "logit_scales"):
        torch.testing.assert_close(compiled[key][0], eager[key][0], atol=1e-5, rtol=1e-5)


def _trainer(precision: str, *extra):
    from training import distributed
    from training.params import parse_config
    from training.trainer import Trainer

    config = parse_config(["--model", "tiny-student-p8", "--teacher", "tiny-teacher", "--dataset-type", "synthetic",
                           "--synthetic-num-samples", "8", "--batch-size", "4", "--workers", "0", "--logs", "",
                           "--precision", precision, "--device", "cpu", "--recipe", "clip-kd", *extra])
    return Trainer(config, distributed.init_distributed(config.runtime.device))


def test_trainer_prepares_the_teacher_after_the_student_inherits_fp32_weights():
    fp32, amp = _trainer("fp32", "--init-from-teacher"), _trainer("amp_bf16", "--init-from-teacher")
    assert fp32.teacher.compute_dtype is None and amp.teacher.compute_dtype is torch.bfloat16
    assert amp.teacher.members[0].visual.conv1.weight.dtype is torch.bfloat16
    assert amp.teacher.runs_towers == ["image", "text"]
    a, b = fp32.student.state_dict(), amp.student.state_dict()
    for k in a:  # the inherited init is the fp32 teacher's, not its bf16 copy
        assert torch.equal(a[k], b[k]), k


def test_trained_steps_leave_the_teacher_untouched_and_out_of_the_optimizer():
    trainer = _trainer("fp32")
    teacher_params = {id(p) for p in trainer.teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized and not optimized & teacher_params
    before = copy.deepcopy(trainer.teacher.state_dict())
    trainer.run(max_steps=2)
    assert trainer.step == 2
    assert all(p.grad is None for p in trainer.teacher.parameters())
    after = trainer.teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_teacher_matmuls_never_copy_a_weight_per_position(precision):
    # torch's matmul folds nn.MultiheadAttention's transposed activations into one mm only against weights that
    # require grad; against frozen ones it expands the weight into a bmm of one copy per position (models/teacher.py)
    from torch.profiler import ProfilerActivity, profile

    _, teacher_model = _models()
    teacher = Teacher([teacher_model])
    teacher.prepare(teacher_dtype(precision, CPU))
    weights = {tuple(p.shape[::-1]) for p in teacher.parameters() if p.ndim == 2}  # (in, out) of each matmul weight
    image, _, tokens = _batch()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        teacher(image, tokens)
    bmm_operands = [e.input_shapes[1] for e in prof.events() if e.name == "aten::bmm"]
    assert [s for s in bmm_operands if len(s) == 3 and tuple(s[1:]) in weights] == []
    linears = sum(isinstance(m, torch.nn.Linear) for m in teacher.modules())
    assert sum(e.name in ("aten::mm", "aten::addmm") for e in prof.events()) >= linears > 0
