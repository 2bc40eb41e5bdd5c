"""Engines and accumulation (training/parallel/, --accum-freq): equivalence with one plain process, and checkpoints
that move between engines.

One 1-process spawn computes the references; one 2-process (gloo) spawn runs every engine job in a row
(tests/parallel_jobs.py). Each job trains 3 optimizer steps at the same global batch of 8 (the tiny configs, the
clip-kd recipe), saving the canonical checkpoint after step 2 ("mid") and step 3 ("final").

What is compared (test_train_e2e.py's conventions): first-step gradients and losses tightly; states after several steps
by relative distance, because Adam turns float noise on coordinates whose exact gradient is 0 (attention key biases)
into O(lr) steps. A checkpoint re-saved right after resuming must equal its source exactly.
"""

import importlib.util
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import training  # noqa: F401
from helpers import free_port, kd_world, optimizer_tensors, relative_distance
from training.models import create_clip

FAKE_HOROVOD = os.path.join(os.path.dirname(__file__), "fake_horovod")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def needs(*names: str) -> None:
    if not HAS_DEEPSPEED and any(n.startswith("zero") for n in names):
        pytest.skip("deepspeed is not installed (pip install deepspeed)")


@pytest.fixture(scope="module")
def world(module_tmp_path):
    w = kd_world(module_tmp_path)
    root = w["root"]
    for stage in (2, 3):
        with open(root / f"zero{stage}.json", "w") as f:
            json.dump({"zero_optimization": {"stage": stage}}, f)
    return w


def argv(world, *extra, batch_size=4):
    return ["--model", "tiny-student", "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", str(batch_size),
            "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32", "--workers", "0", "--logs", "",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu",
            "--recipe", "clip-kd", "--gather-with-grad", *extra]


def _spawn(nprocs, jobs, out_dir):
    from parallel_jobs import run_jobs

    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(run_jobs, args=(nprocs, free_port(), jobs, out_dir), nprocs=nprocs, join=True)
    return {job["name"]: torch.load(os.path.join(out_dir, f"{job['name']}.pt"), weights_only=False) for job in jobs}


@pytest.fixture(scope="module")
def runs(world):
    """Every job's record, by name (see tests/parallel_jobs.py)."""
    out = str(world["root"] / "runs")
    zero2, zero3 = str(world["root"] / "zero2.json"), str(world["root"] / "zero3.json")
    clip = ["--grad-clip-norm", "0.5"]
    one = [dict(name="ref", argv=argv(world, batch_size=8), mid=2, steps=3),
           dict(name="ref_accum2", argv=argv(world, "--accum-freq", "2"), mid=2, steps=3),
           dict(name="ref_clip", argv=argv(world, *clip, batch_size=8), mid=2, steps=3)]
    engines = {"ddp": [], "fsdp": ["--fsdp", "--grad-checkpointing"], "zero2": ["--deepspeed", zero2],
               "zero3": ["--deepspeed", zero3], "fsdp_teacher": ["--fsdp", "--fsdp-shard-teacher"]}
    two = [dict(name=name, argv=argv(world, *flags, batch_size=4), mid=2, steps=3) for name, flags in engines.items()]
    two += [dict(name=f"{name}_accum2", argv=argv(world, *engines[name], "--accum-freq", "2", batch_size=2), mid=2,
                 steps=3) for name in ("ddp", "fsdp", "zero2")]
    two += [dict(name="horovod", argv=argv(world, "--horovod"), mid=2, steps=3, sys_path=FAKE_HOROVOD),
            dict(name="horovod_clip", argv=argv(world, "--horovod", *clip), mid=2, steps=3, sys_path=FAKE_HOROVOD),
            dict(name="fsdp_clip", argv=argv(world, "--fsdp", *clip), mid=2, steps=3)]
    for target, source in (("ddp", "fsdp"), ("fsdp", "ddp"), ("ddp", "zero2"), ("zero2", "ddp"), ("ddp", "zero3"),
                           ("zero3", "ddp"), ("fsdp", "zero2")):
        two.append(dict(name=f"{target}_from_{source}", argv=argv(world, *engines[target]), mid=2, steps=3,
                        resume=os.path.join(out, f"{source}.mid.ckpt")))
    if not HAS_DEEPSPEED:
        two = [job for job in two if "zero" not in job["name"]]
    records = _spawn(1, one, out)
    records.update(_spawn(2, two, out))
    return records


# ---- comparisons ----------------------------------------------------------------------------------------------------

_relative, _optimizer_tensors = relative_distance, optimizer_tensors


def assert_same_training(ref: dict, other: dict, grads: bool = True) -> None:
    for k, v in ref["losses"][0].items():  # step 1: same batch, same weights
        assert abs(v - other["losses"][0][k]) <= 1e-6 + 1e-5 * abs(v), (k, v, other["losses"][0][k])
    for a, b in zip(ref["losses"][1:], other["losses"][1:]):
        assert abs(a["total"] - b["total"]) <= 1e-4 * abs(a["total"]), (a, b)
    if grads:
        g1, g2 = ref["grads"], other["grads"]
        assert g1.keys() == g2.keys() and len(g1) > 10
        for k in g1:  # float32 reduction-order noise: 1e-6 of the tensor's largest entry
            atol = 1e-6 * max(1.0, float(g1[k].abs().max()))
            assert torch.allclose(g1[k], g2[k], atol=atol, rtol=1e-4), (k, (g1[k] - g2[k]).abs().max())
    for ckpt in ("mid", "final"):
        assert other[ckpt]["step"] == ref[ckpt]["step"]
        assert _relative(ref[ckpt]["model"], other[ckpt]["model"]) < 1e-3, ckpt
        assert _relative(ref[ckpt]["loss"], other[ckpt]["loss"]) < 1e-3, ckpt
        assert _relative(_optimizer_tensors(ref[ckpt]["optimizer"]),
                         _optimizer_tensors(other[ckpt]["optimizer"])) < 1e-3, ckpt


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Exactly the same model, loss-side heads and optimizer state (the canonical format round-trips)."""
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert a[part][k].dtype == b[part][k].dtype and torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert oa["state"][i].keys() == ob["state"][i].keys()
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    for ga, gb in zip(oa["param_groups"], ob["param_groups"]):
        assert (ga["lr"], ga["weight_decay"], tuple(ga["betas"]), ga["eps"]) == \
               (gb["lr"], gb["weight_decay"], tuple(gb["betas"]), gb["eps"])
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"])


# ---- tests ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp_teacher", "zero2", "zero3", "horovod"])
def test_two_processes_match_one_whatever_the_engine(runs, engine):
    # fsdp runs with --grad-checkpointing, fsdp_teacher also shards the frozen teacher; horovod runs through a
    # stand-in module (tests/fake_horovod: horovod cannot be built here)
    needs(engine)
    assert_same_training(runs["ref"], runs[engine])


@pytest.mark.parametrize("engine", ["fsdp", "horovod"])
def test_gradient_clipping_is_global_under_sharding(runs, engine):
    # one norm over the sharded student, the replicated logit scale and the loss-side heads, as in one process
    # (the recorded first-step gradients are taken after clipping)
    assert _relative(runs["ref"]["final"]["model"], runs["ref_clip"]["final"]["model"]) > 1e-3  # clipping is active
    assert_same_training(runs["ref_clip"], runs[f"{engine}_clip"])


def test_accumulation_matches_the_full_batch_in_one_process(runs):
    # --accum-freq 2 x batch 4 == batch 8: every loss term of step 1, the first gradients, then the states
    assert_same_training(runs["ref"], runs["ref_accum2"])


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_accumulation_matches_the_full_batch_under_every_engine(runs, engine):
    needs(engine)
    assert_same_training(runs["ref"], runs[f"{engine}_accum2"])


@pytest.mark.parametrize("target,source", [("ddp", "fsdp"), ("fsdp", "ddp"), ("ddp", "zero2"), ("zero2", "ddp"),
                                           ("ddp", "zero3"), ("zero3", "ddp"), ("fsdp", "zero2")])
def test_checkpoints_move_between_engines(runs, target, source):
    needs(target, source)
    resumed = runs[f"{target}_from_{source}"]
    assert_same_checkpoint(runs[source]["mid"], resumed["reloaded"])
    # and training goes on as if it had never stopped (Adam step counts, moments, schedule position)
    assert resumed["final"]["step"] == 3
    for part in ("model", "loss"):
        assert _relative(runs["ref"]["final"][part], resumed["final"][part]) < 1e-3, part
    assert _relative(_optimizer_tensors(runs["ref"]["final"]["optimizer"]),
                     _optimizer_tensors(resumed["final"]["optimizer"])) < 1e-3


@pytest.mark.parametrize("engine", ["fsdp", "fsdp_teacher", "zero3", "zero2"])
def test_the_bare_student_can_be_evaluated_inside_unsharded(runs, engine):
    needs(engine)
    for a, b in zip(runs["ref"]["embeddings"], runs[engine]["embeddings"]):
        assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max())), (a - b).abs().max()


def test_checkpoints_hold_the_plain_student(runs, world):
    """The `model` entry of an FSDP2 / ZeRO-3 checkpoint loads into a bare open_clip model (no wrapper prefixes)."""
    for engine in ("fsdp", "zero3") if HAS_DEEPSPEED else ("fsdp",):
        model = create_clip("tiny-student", None, torch.device("cpu"))
        model.load_state_dict(runs[engine]["final"]["model"])  # strict
        assert runs[engine]["final"]["model"]["logit_scale"].shape == torch.Size([])


@pytest.mark.slow
def test_torchcompile_under_fsdp_and_ddp_matches_eager(runs, world):
    # --torchcompile compiles every block in place before wrapping (inductor on CPU: minutes, hence slow)
    out = str(world["root"] / "runs-compiled")
    jobs = [dict(name=f"{name}_compiled", argv=argv(world, *flags, "--torchcompile"), mid=2, steps=3)
            for name, flags in (("fsdp", ["--fsdp", "--grad-checkpointing"]), ("ddp", []))]
    for record in _spawn(2, jobs, out).values():
        assert_same_training(runs["ref"], record)
