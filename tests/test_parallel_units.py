"""Single-process pieces of scale-out: GradCache replays the patch masks, micro-batch grouping, flag checks."""

import json

import pytest
import torch

import training  # noqa: F401
from helpers import write_image_csv
from training import distributed
from training.accumulation import concat, group_micro_batches
from training.data import DataInfo
from training.models import create_clip
from training.params import UsageError, parse_config
from training.train import accumulated_step, distill_losses, model_inputs, student_forward, teacher_outputs
from training.trainer import Trainer


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=16, size=64)
    teacher = str(root / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    return {"root": root, "csv": csv, "data_root": str(root / "data"), "teacher": teacher}


def _argv(world, *extra):
    return ["--model", "tiny-student", "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", "4", "--epochs", "1",
            "--precision", "fp32", "--workers", "0", "--logs", "", "--device", "cpu", *extra]


def _full_graph_grads(trainer, micro_batches) -> tuple[dict, dict]:
    """Reference for GradCache: all micro-batches forwarded WITH a graph, losses on the concatenation, one backward."""
    trainer.engine.zero_grad()
    students, teachers = [], []
    for i, batch in enumerate(micro_batches):
        image, text = model_inputs(trainer, batch)
        with torch.no_grad():
            teachers.append(teacher_outputs(trainer, batch, image, text))
        students.append(student_forward(trainer, image, text, micro_batch=i))  # masks keyed by global position
    losses = distill_losses(trainer, concat(students), concat(teachers))
    losses["total"].backward()
    return losses, _grads(trainer)


def _grads(trainer) -> dict:
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in trainer.loss_fn.named_parameters() if p.grad is not None})
    return grads


def test_gradcache_replays_the_patch_masks_of_the_cached_pass(world):
    # mfd masks a random half of the student's patches: the graph pass must draw the masks of the cached pass
    trainer = Trainer(parse_config(_argv(world, "--accum-freq", "2", "--distill", "task=1,fd=2000,mfd=2000")),
                      distributed.init_distributed("cpu"))
    assert trainer.model.mask_ratio > 0
    trainer.model.train()
    trainer.data.set_epoch(0)
    micro_batches = next(iter(trainer.data.dataloader))
    assert len(micro_batches) == 2
    trainer.engine.step = lambda: None  # keep the weights: compare gradients

    torch.manual_seed(123)
    losses = accumulated_step(trainer, micro_batches)
    cached = _grads(trainer)
    torch.manual_seed(123)
    ref_losses, ref = _full_graph_grads(trainer, micro_batches)
    for k in ref_losses:
        assert torch.allclose(losses[k], ref_losses[k], atol=1e-6, rtol=1e-5), k
    assert cached.keys() == ref.keys() and len(cached) > 10
    for k in ref:
        assert torch.allclose(cached[k], ref[k], atol=1e-6 * max(1.0, float(ref[k].abs().max())), rtol=1e-4), k
    trainer.step += 1  # other masks (keyed by the step), other gradients: the comparison above does see the masks
    _, other = _full_graph_grads(trainer, micro_batches)
    assert not torch.allclose(other["visual.conv1.weight"], ref["visual.conv1.weight"], rtol=1e-3)


def test_micro_batches_are_grouped_per_optimizer_step():
    calls = []
    info = DataInfo(dataloader=list(range(7)), num_batches=7, num_samples=28,
                    set_epoch_fn=lambda epoch, start: calls.append((epoch, start)))
    assert group_micro_batches(info, 1) is info
    grouped = group_micro_batches(info, 3)
    assert grouped.num_batches == 2 and len(grouped.dataloader) == 2
    assert list(grouped.dataloader) == [[0, 1, 2], [3, 4, 5]]  # the incomplete last group is dropped
    assert list(grouped.dataloader) == [[0, 1, 2], [3, 4, 5]]  # re-iterable, like a DataLoader
    grouped.set_epoch(1, 1)  # mid-epoch resume counts optimizer steps
    assert calls == [(1, 3)]
    with pytest.raises(UsageError, match="at least 8 batches"):
        group_micro_batches(info, 8)


@pytest.mark.parametrize("flags,message", [
    (["--fsdp", "--deepspeed", "x.json"], "choose one of"),
    (["--fsdp-shard-teacher"], "needs --fsdp"),
    (["--accum-freq", "0"], "--accum-freq must be"),
    (["--deepspeed", "/nonexistent.json"], "config not found"),
])
def test_conflicting_scale_out_flags_are_usage_errors(flags, message):
    from training.parallel import check_config

    with pytest.raises(UsageError, match=message):
        check_config(parse_config(flags).parallel)


def _deepspeed_config(argv, world_size):
    """training.parallel.deepspeed_config with the values the flags give."""
    from training.parallel import deepspeed_config

    config = parse_config(argv)
    return deepspeed_config(config.parallel.deepspeed, batch_size=config.data.batch_size,
                            accum_freq=config.optim.accum_freq, grad_clip_norm=config.optim.grad_clip_norm,
                            precision=config.runtime.precision, world_size=world_size)


def test_deepspeed_config_takes_batch_accumulation_clipping_and_precision_from_the_flags(tmp_path):

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    cfg = _deepspeed_config(["--deepspeed", str(path), "--batch-size", "16", "--accum-freq", "2",
                             "--precision", "bf16"], world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 128 and cfg["gradient_clipping"] == 0.0  # DeepSpeed would clip to 1.0
    assert cfg["bf16"] == {"enabled": True} and cfg["zero_optimization"] == {"stage": 2}
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(UsageError, match="train_batch_size=64"):
        _deepspeed_config(["--deepspeed", str(path), "--batch-size", "16"], world_size=1)
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(UsageError, match="enables fp16"):
        _deepspeed_config(["--deepspeed", str(path)], world_size=1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_configs_are_accepted(stage):
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "deepspeed",
                        f"zero{stage}.json")
    cfg = _deepspeed_config(["--deepspeed", path, "--precision", "amp_bf16"], world_size=8)
    assert cfg["zero_optimization"]["stage"] == stage and cfg["train_batch_size"] == 64 * 8
