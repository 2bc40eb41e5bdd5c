"""Spec parsing, schedules, presets, spec resolution from the CLI flags, and the one-line errors."""

import pytest

from training.distill import (
    PRESETS,
    VALID_TERMS,
    DistillSpecError,
    WeightSchedule,
    build_distill_loss,
    create_distill_loss,
    parse_feat_layers,
    parse_spec,
    resolve_spec,
)
from training.distill.spec import check_combinations
from training.params import UsageError, parse_args, parse_config


def test_parse_spec_weights_and_bare_terms():
    terms = parse_spec(" task=1, crd = 0.5 ,icl,fd=2e3 ")
    assert list(terms) == ["task", "crd", "icl", "fd"]
    assert [terms[k](0) for k in terms] == [1.0, 0.5, 1.0, 2000.0]


def test_schedules():
    s = parse_spec("fd=2000@warmup:1000:5000,crd=1@from:3000,icl=1@warmup:100")
    fd, crd, icl = s["fd"], s["crd"], s["icl"]
    assert fd == WeightSchedule(2000.0, "warmup", 1000, 5000)
    assert [fd(k) for k in (0, 1000, 2000, 3000, 5000, 9999)] == [0, 0, 500, 1000, 2000, 2000]
    assert [crd(k) for k in (0, 2999, 3000, 10**6)] == [0, 0, 1, 1]
    assert icl(50) == pytest.approx(0.5) and icl(100) == 1.0
    assert str(fd) == "2000@warmup:1000:5000" and str(crd) == "1@from:3000"
    loss = build_distill_loss("task=1,fd=2000@warmup:0:5000,crd=1@from:3000", 4, 4)
    assert loss.effective_weights(2500) == {"task": 1.0, "fd": 1000.0, "crd": 0.0}


@pytest.mark.parametrize("spec, fragment", [
    ("task=1,foo=2", "unknown distillation term 'foo'"),
    ("fd=abc", "bad weight 'abc'"),
    ("fd=-1", "bad weight '-1'"),
    ("fd=nan", "bad weight 'nan'"),
    ("fd=", "missing weight"),
    ("fd=1@warmup:5:2", "warmup:a:b needs a < b"),
    ("fd=1@warmup:a:5", "bad step 'a'"),
    ("fd=1@ramp:3", "expected @warmup:a:b or @from:k"),
    ("crd=1@from:", "expected @warmup:a:b or @from:k"),
    ("crd=1@from:1:2", "expected @warmup:a:b or @from:k"),
    ("task=1,task=2", "appears twice"),
    ("task=1,,crd=1", "empty item"),
    ("", "empty distillation spec"),
    ("Task=1", "unknown distillation term 'Task'"),
])
def test_malformed_specs_raise_one_line_error_listing_valid_terms(spec, fragment):
    with pytest.raises(DistillSpecError) as info:
        parse_spec(spec)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "valid terms: " + ", ".join(VALID_TERMS) in msg
    assert isinstance(info.value, ValueError)


def test_unsupported_setups_raise_spec_errors():
    cases = [
        lambda: build_distill_loss("task=1,bogus=1", 4, 4),
        lambda: build_distill_loss("crd=1", 4, None),  # needs a teacher
        lambda: build_distill_loss("mfd=1", 4, 4, mask_ratio=0.0),
        lambda: build_distill_loss("feat=1", 4, 4),  # layer pairs unresolved
        lambda: build_distill_loss("fd=1", 4, [4, 4], teacher_member=2),
        lambda: build_distill_loss("emb=1", 4, 4, emb_metric="huber"),
        lambda: build_distill_loss("crd=1", 4, 4, kd_temperature=0),
        lambda: build_distill_loss("crd=1", 4, 4, compat="tinyclip"),
        lambda: build_distill_loss("task=0,crd=0", 4, 4),
        lambda: resolve_spec(recipe="clip_kd"),
        lambda: resolve_spec(recipe="mobileclip:2"),
    ]
    for make in cases:
        with pytest.raises(DistillSpecError, match="valid terms: task, crd"):
            make()


def test_presets():
    assert resolve_spec(recipe="clip-kd").terms == parse_spec("task=1,crd=1,icl=1,fd=2000")
    tiny = resolve_spec(recipe="tinyclip")
    assert set(tiny.terms) == {"crd"}
    assert tiny.options == {"teacher_logit_scale": 50.0, "student_kd_logit_scale": 50.0}
    assert {k: v(0) for k, v in resolve_spec(recipe="mobileclip").terms.items()} == {"task": 0.0, "crd": 1.0}
    assert {k: v(0) for k, v in resolve_spec(recipe="mobileclip:0.7").terms.items()} == pytest.approx(
        {"task": 0.3, "crd": 0.7})
    assert set(resolve_spec(recipe="distillclip").terms) == {"sim"}
    assert resolve_spec(recipe="open_clip").options == {"crd_soft_ce": True}
    assert set(resolve_spec(recipe="nvidia").terms) == {"emb"}
    assert str(resolve_spec(recipe="none")) == "task=1"
    for name in PRESETS:  # every preset builds
        spec = resolve_spec(recipe=name)
        build_distill_loss(spec, 8, [8, 8] if name == "mobileclip" else 8)


def test_resolution_order():
    # explicit --distill beats --recipe; alias weights are merged over either
    assert str(resolve_spec("task=1,fd=5", "clip-kd")) == "task=1,fd=5"
    assert str(resolve_spec(None, "clip-kd", {"fd": 100.0, "gd": 1.0})) == "task=1,crd=1,icl=1,fd=100,gd=1"
    # CLIP-KD's own scripts pass only alpha flags
    assert str(resolve_spec(None, None, {"crd": 1.0, "icl": 1.0, "fd": 2000.0})) == "task=1,crd=1,icl=1,fd=2000"
    assert str(resolve_spec()) == "task=1"
    assert str(resolve_spec(None, "clip-kd", {"icl": 0.0})) == "task=1,crd=1,icl=0,fd=2000"


def test_distill_loss_from_args():
    args = parse_config(["--alpha_ckd_loss", "1", "--alpha_icl_loss", "1", "--alpha_fd_loss", "2000"])
    loss = create_distill_loss(args.distill, 8, [16], seed=0)
    assert loss.spec == "task=1,crd=1,icl=1,fd=2000"
    assert loss.proj_image.in_features == 8 and loss.proj_image.out_features == 16
    assert not loss.local_loss and not loss.gather_with_grad

    loss = create_distill_loss(parse_config(["--recipe", "tinyclip"]).distill, 8, 8, seed=0)
    assert loss.spec == "crd=1" and loss.teacher_logit_scale == 50.0 and loss.student_kd_logit_scale == 50.0
    loss = create_distill_loss(parse_config(["--recipe", "tinyclip", "--teacher-logit-scale", "70"]).distill, 8, 8,
                               seed=0)
    assert loss.teacher_logit_scale == 70.0  # explicit flag beats the preset default

    args = parse_config(["--distill", "task=1,xkd=1,afd=1,emb_text=2,mfd=1", "--recipe", "clip-kd", "--kd-compat",
                       "clipkd", "--kd-auto-balance", "uncertainty", "--local-loss", "--gather-with-grad",
                       "--kd-temperature", "4", "--emb-metric", "cosine", "--mask-ratio", "0.6"])
    loss = create_distill_loss(args.distill, 8, [8, 8], seed=0)
    assert loss.spec == "task=1,xkd=1,afd=1,emb_text=2,mfd=1"
    assert (loss.compat, loss.auto_balance, loss.local_loss, loss.gather_with_grad) == ("clipkd", "uncertainty",
                                                                                        True, True)
    assert loss.kd_temperature == 4.0 and loss.emb_metric == "cosine" and loss.mask_ratio == 0.6
    assert loss.feature_teacher_dim == 16 and set(loss.log_vars) == {"task", "xkd", "afd", "emb_text", "mfd"}
    desc = loss.describe()
    assert "local loss" in desc and "tau=4" in desc and "compat=clipkd" in desc and "\n" not in desc
    assert create_distill_loss(parse_config(["--recipe", "open_clip"]).distill, 8, 8, seed=0).crd_soft_ce
    member = create_distill_loss(parse_config(["--distill", "fd=1", "--kd-teacher-member", "1"]).distill, 8, [8, 4],
                                 seed=0)
    assert member.feature_teacher_dim == 4 and member.proj_image.out_features == 4

    with pytest.raises(DistillSpecError, match="unknown distillation term 'fdd'.*valid terms"):
        create_distill_loss(parse_config(["--distill", "task=1,fdd=1"]).distill, 8, 8, seed=0)
    with pytest.raises(DistillSpecError, match="feat needs the student and teacher models"):
        create_distill_loss(parse_config(["--distill", "feat=1"]).distill, 8, 8, seed=0)


def test_parse_feat_layers():
    assert parse_feat_layers(None) is None and parse_feat_layers(" ") is None
    assert parse_feat_layers("0:1,-1:-1") == {"image": [(0, 1), (-1, -1)], "text": [(0, 1), (-1, -1)]}
    assert parse_feat_layers("image:0:2, t:1:3") == {"image": [(0, 2)], "text": [(1, 3)]}
    for bad in ("0-1", "a:1", "image:0", "audio:0:1"):
        with pytest.raises(DistillSpecError, match="feat-layers"):
            parse_feat_layers(bad)


@pytest.mark.parametrize("flags", [
    ["--distill", "task=1,mfd=1,feat=1"],
    ["--distill", "task=1,mfd=1@from:100,feat=1"],  # scheduled terms count: the student forward is masked from step 0
    ["--distill", "mfd=1,feat=1", "--feat-layers", "image:0:1"],
    ["--distill", "mfd=1,feat=1", "--feat-layers", "0:1"],  # a bare pair applies to both towers
    ["--recipe", "clip-kd", "--distill", "fd=1,mfd=1,feat=2"],
])
def test_mfd_with_image_feat_is_refused_at_parse_time(flags):
    with pytest.raises(DistillSpecError) as info:
        parse_args(flags)
    msg = str(info.value)
    assert "mfd and feat" in msg and "--feat-layers text:" in msg and "\n" not in msg
    assert isinstance(info.value, UsageError)  # every entry point prints it as one line, exit 2


def test_combinations_that_can_run():
    for flags in (["--distill", "mfd=1,feat=1", "--feat-layers", "text:0:1"],
                  ["--distill", "mfd=0,feat=1"], ["--distill", "mfd=1,fd=1"], ["--distill", "feat=1"]):
        parse_args(flags)
    check_combinations(parse_spec("mfd=1,feat=1"), "t:0:1,text:-1:-1")
    with pytest.raises(DistillSpecError, match="mfd and feat"):
        check_combinations(parse_spec("mfd=1,feat=1"), None)


def test_bad_spec_fails_at_parse_time():
    with pytest.raises(DistillSpecError, match="unknown distillation term 'bogus'"):
        parse_args(["--distill", "task=1,bogus=1"])
    with pytest.raises(DistillSpecError, match="feat-layers"):
        parse_args(["--distill", "feat=1", "--feat-layers", "0-1"])
