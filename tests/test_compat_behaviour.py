"""The open_clip / CLIP-KD flags that do real work, each against an independent reference: FLIP patch dropout,
--opt through timm, open_clip_train's own schedulers, checkpoint pruning and epoch_latest.pt, wandb (a stand-in
module), --remote-sync to a local fsspec path, SyncBatchNorm, the --imagenet-* and --val-data-root evaluation,
CLIP-KD's --eval / --t-eval, locked towers with unlocked groups and frozen BatchNorm statistics."""

import filecmp
import os
import sys
import types

import pytest
import torch
from PIL import Image

import training  # noqa: F401
from helpers import kd_world, small_run_argv, small_world, write_image_csv
from training.config import ModelConfig, OptimConfig
from training.errors import UsageError
from training.main import main
from training.models import create_student
from training.optim import create_optimizer, param_groups
from training.params import parse_config
from training.scheduler import LRSchedule


@pytest.fixture(scope="module")
def world(module_tmp_path):
    return small_world(module_tmp_path)


_argv = small_run_argv


# ---- FLIP patch dropout ------------------------------------------------------------------------------------------
def test_force_patch_dropout_drops_patch_tokens_in_training_only():
    torch.manual_seed(0)
    clip = create_student(ModelConfig(model="tiny-student", force_patch_dropout=0.5), torch.device("cpu")).model
    assert clip.visual.patch_dropout.prob == 0.5
    seen = []
    clip.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    image = torch.randn(2, 3, 64, 64)
    clip.train()
    clip.encode_image(image)
    clip.eval()
    clip.encode_image(image)
    # 16 patches + the class token; training keeps the class token and int(16 * 0.5) patches, as FLIP
    assert seen == [1 + 8, 1 + 16]
    plain = create_student(ModelConfig(model="tiny-student"), torch.device("cpu")).model
    assert plain.visual.patch_dropout.__class__.__name__ == "Identity"


# ---- --opt ------------------------------------------------------------------------------------------------------
def _student_and_loss():
    from training.distill import build_distill_loss

    torch.manual_seed(0)
    clip = create_student(ModelConfig(model="tiny-student"), torch.device("cpu")).model
    return clip, build_distill_loss("task=1", student_dim=64, teacher_dim=None)


def test_opt_sgd_with_momentum_keeps_the_no_weight_decay_groups():
    clip, loss = _student_and_loss()
    groups = param_groups(clip, loss, wd=0.1)
    optimizer = create_optimizer(groups, OptimConfig(opt="timm/momentum", momentum=0.5, lr=0.01, wd=0.1))
    assert type(optimizer) is torch.optim.SGD
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]
    assert all(g["momentum"] == 0.5 and not g["nesterov"] for g in optimizer.param_groups)
    no_wd = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(clip.logit_scale) in no_wd and all(id(m.bias) in no_wd for m in clip.modules()
                                                 if isinstance(m, torch.nn.Linear) and m.bias is not None)
    # one step is SGD with momentum and decoupled-free (L2) weight decay: p -= lr * (g + wd * p) on the decay group
    p = optimizer.param_groups[1]["params"][0]
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    optimizer.step()
    torch.testing.assert_close(p.detach(), before - 0.01 * (1 + 0.1 * before))
    nesterov = create_optimizer(param_groups(clip, loss, 0.1), OptimConfig(opt="timm/sgd", momentum=0.9))
    assert nesterov.param_groups[0]["nesterov"]  # timm's sgd is Nesterov's, as open_clip's --opt timm/sgd
    adamw = create_optimizer(param_groups(clip, loss, 0.1), OptimConfig())
    assert type(adamw) is torch.optim.AdamW


@pytest.mark.parametrize("argv, message", [
    (["--opt", "timm/nope"], "--opt timm/nope: timm has no optimizer 'nope'"),
    (["--momentum", "0.9"], "--momentum has no effect with --opt adamw"),
    (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
    (["--epochs-cooldown", "2"], "--epochs-cooldown needs --lr-scheduler const-cooldown"),
    (["--lr-scheduler", "const-cooldown", "--epochs-cooldown", "32"], "must be below --epochs 32"),
    (["--wandb-notes", "x"], "--wandb-notes needs --report-to wandb"),
    (["--remote-sync", "/tmp/x"], "--remote-sync-protocol s3 needs an s3:// URL"),
    (["--remote-sync", "nope://x", "--remote-sync-protocol", "fsspec"], "--remote-sync nope://x"),
    (["--use-bn-sync", "--fsdp"], "--use-bn-sync applies to DDP, not --fsdp"),
    (["--eval", "--resume", "latest", "--name", "x"], "--eval evaluates the weights of --resume PATH"),
    (["--force-image-size", "224", "192"], "only square sizes"),
])
def test_options_that_only_mean_something_together_are_refused_in_one_line(argv, message):
    with pytest.raises(UsageError) as err:
        cfg = parse_config(argv)
        from training import parallel

        parallel.check_config(cfg.parallel)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---- schedules against open_clip_train's own functions ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "const", "const-cooldown"])
def test_lr_schedule_matches_open_clip_train(kind):
    from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

    steps_per_epoch, epochs, warmup = 7, 5, 4
    total = steps_per_epoch * epochs
    ours_opt, ref_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    optim = OptimConfig(lr=0.1, warmup=warmup, epochs=epochs, lr_scheduler=kind,
                        epochs_cooldown=2 if kind == "const-cooldown" else None, lr_cooldown_end=0.01,
                        lr_cooldown_power=2.0)
    ours = LRSchedule.from_config(ours_opt, optim, steps_per_epoch)
    ref = {"cosine": lambda: cosine_lr(ref_opt, 0.1, warmup, total),
           "const": lambda: const_lr(ref_opt, 0.1, warmup, total),
           "const-cooldown": lambda: const_lr_cooldown(ref_opt, 0.1, warmup, total, steps_per_epoch * 2, 2.0, 0.01),
           }[kind]()
    for step in range(total):
        ours(step)
        ref(step)
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)


def test_skip_scheduler_keeps_the_base_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LRSchedule.from_config(opt, OptimConfig(lr=0.1, warmup=10, skip_scheduler=True), 3)
    assert {schedule(s) for s in range(0, 90, 7)} == {0.1} and opt.param_groups[0]["lr"] == 0.1


# ---- one run: pruning, epoch_latest.pt, wandb, remote sync, --opt, the cooldown ---------------------------------
class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, data, step=None):
        self.logs.append((step, dict(data)))

    def finish(self):
        self.finished += 1


def test_a_run_with_open_clip_flags(world, monkeypatch, tmp_path):
    from open_clip_train.scheduler import const_lr_cooldown

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    remote = tmp_path / "remote"
    argv = _argv(world, "oc", "--save-most-recent", "--delete-previous-checkpoint", "--report-to", "wandb",
                 "--wandb-project-name", "proj", "--wandb-notes", "a note", "--remote-sync", str(remote),
                 "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "1", "--opt", "timm/momentum",
                 "--momentum", "0.5", "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1",
                 "--lr-cooldown-end", "1e-4", "--log-every-n-steps", "1", "--force-patch-dropout", "0.25")
    assert main(argv) == 0
    run = world["root"] / "logs" / "oc"
    folder = run / "checkpoints"
    # --delete-previous-checkpoint: only the newest epoch file; --save-most-recent: epoch_latest.pt beside it
    assert sorted(os.listdir(folder)) == ["epoch_2.pt", "epoch_latest.pt", "latest.txt"]
    final = torch.load(folder / "epoch_2.pt", weights_only=True)
    latest = torch.load(folder / "epoch_latest.pt", weights_only=True)
    assert latest["step"] == final["step"] == 6
    assert all(torch.equal(final["model"][k], latest["model"][k]) for k in final["model"])
    assert final["args"]["opt"] == "timm/momentum" and final["args"]["force_patch_dropout"] == 0.25
    assert any("momentum_buffer" in s for s in final["optimizer"]["state"].values())  # SGD's state, not Adam's
    # wandb: open_clip's init arguments, and the LR of every step is open_clip's const-cooldown
    (init,) = fake.inits
    assert (init["project"], init["name"], init["notes"]) == ("proj", "oc", "a note")
    assert init["config"]["opt"] == "timm/momentum" and fake.finished == 1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = const_lr_cooldown(opt, 1e-3, 1, 6, 3, 1.0, 1e-4)
    train = [(step, data) for step, data in fake.logs if "train/lr" in data]
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6]
    assert [d["train/lr"] for _, d in train] == pytest.approx([reference(s) for s in range(6)])
    # --remote-sync: the run folder mirrored at <URL>/<name>
    mirrored = remote / "oc"
    for dirpath, _, names in os.walk(run):
        for name in names:
            local = os.path.join(dirpath, name)
            copy = mirrored / os.path.relpath(local, run)
            if name == "out.log":  # the sync's own log line comes after its copy
                assert open(local).read().startswith(copy.read_text())
            else:
                assert filecmp.cmp(local, copy, shallow=False), local


def test_remote_sync_copies_only_what_changed(tmp_path):
    from training.config import LoggingConfig
    from training.remote_sync import RemoteSync

    run = tmp_path / "logs" / "r"
    run.mkdir(parents=True)
    (run / "a.txt").write_text("1")
    sync = RemoteSync(LoggingConfig(logs=str(tmp_path / "logs"), name="r", remote_sync=str(tmp_path / "up"),
                                    remote_sync_protocol="fsspec", remote_sync_frequency=3600), str(run), True)
    assert sync.sync() == 1 and sync.sync() == 0
    sync.maybe_sync()  # not due for an hour: nothing happens
    (run / "sub").mkdir()
    (run / "sub" / "b.txt").write_text("2")
    assert sync.sync() == 1 and (tmp_path / "up" / "r" / "sub" / "b.txt").read_text() == "2"
    assert not RemoteSync(LoggingConfig(), str(run), False).enabled


def test_report_to_wandb_without_wandb_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match=r"--report-to wandb needs the wandb package: pip install -e '\.\[wandb\]'"):
        parse_config(["--report-to", "wandb"])


# ---- SyncBatchNorm -------------------------------------------------------------------------------------------------
def test_use_bn_sync_converts_the_students_batchnorm_and_refuses_cpu():
    from training.parallel.ddp import sync_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with pytest.raises(UsageError, match="SyncBatchNorm runs on CUDA only"):
        sync_batchnorm(model, torch.device("cpu"))
    converted = sync_batchnorm(model, torch.device("cuda"))  # conversion itself needs no GPU
    assert isinstance(converted[1], torch.nn.SyncBatchNorm) and converted[1].num_features == 4
    assert parse_config(["--use-bn-sync"]).parallel.use_bn_sync


# ---- evaluation: --imagenet-*, --val-data-root, --eval, --t-eval -------------------------------------------------
def _wnid_folder(root, wnids, per_class=2):
    for i, wnid in enumerate(wnids):
        os.makedirs(root / wnid, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 17 * j)).save(root / wnid / f"{j}.jpg")
    return str(root)


def test_imagenet_flags_and_val_data_root_feed_the_training_evaluator(tmp_path):
    from training.data.transforms import EvalTransform
    from training.eval.datasets import DatasetSpec, load_classification
    from training.eval.hook import TrainingEvaluator
    from training.eval.zeroshot import run_zeroshot

    with open(os.path.join(os.path.dirname(training.__file__), "eval", "imagenet_r_wnids.txt")) as f:
        wnids = f.read().split()[:3]
    folder = _wnid_folder(tmp_path / "imagenet-r", wnids)
    # a CLIP-KD val CSV whose relative paths resolve against --val-data-root, not --data-root
    val_csv = write_image_csv(str(tmp_path / "val"), n=6, size=64)
    cfg = parse_config(["--imagenet-r", folder, "--val-data", val_csv, "--val-data-root", str(tmp_path / "val"),
                        "--data-root", str(tmp_path / "elsewhere"), "--zeroshot-frequency", "2", "--workers", "0"])
    evaluator = TrainingEvaluator(cfg.eval, cfg.data, cfg.runtime, epochs=4)
    bundle = create_student(ModelConfig(model="tiny-student"), torch.device("cpu"))
    preprocess = EvalTransform(bundle.image_format)
    out = evaluator(bundle.model, preprocess, bundle.tokenizer, 2, "cpu")
    reference = run_zeroshot(bundle.model, bundle.tokenizer, load_classification(
        DatasetSpec("imagenet-r", "imagenet-r", folder), "test"), preprocess, torch.device("cpu"), workers=0)
    assert out["zeroshot/imagenet-r/top1"] == reference["top1"]
    assert "retrieval/image_to_text_R@1" in out
    at_1 = evaluator(bundle.model, preprocess, bundle.tokenizer, 1, "cpu")  # retrieval every epoch, ImageNet every 2
    assert "zeroshot/imagenet-r/top1" not in at_1 and "retrieval/image_to_text_R@1" in at_1
    with pytest.raises(UsageError, match="--imagenet-a: path not found"):
        cfg = parse_config(["--imagenet-a", str(tmp_path / "missing")])
        TrainingEvaluator(cfg.eval, cfg.data, cfg.runtime)


def test_clipkd_eval_evaluates_a_checkpoint_without_training(tmp_path):
    kd = kd_world(tmp_path, n=8)
    logs = tmp_path / "logs"
    common = ["--model", "tiny-student", "--train-data", kd["csv"], "--data-root", kd["data_root"], "--batch-size",
              "4", "--precision", "fp32", "--workers", "0", "--device", "cpu", "--logs", str(logs),
              "--val-data", kd["csv"], "--zeroshot-frequency", "0"]
    assert main(common + ["--name", "train", "--epochs", "1", "--warmup", "1", "--val-frequency", "0"]) == 0
    ckpt = logs / "train" / "checkpoints" / "epoch_1.pt"
    # CLIP-KD's --eval: weights from --resume PATH, every set once (even at --val-frequency 0), no training
    assert main(common + ["--name", "ev", "--eval", "--resume", str(ckpt), "--val-frequency", "0"]) == 0
    text = (logs / "ev" / "out.log").read_text()
    assert "eval step 0 | retrieval/image_to_text_R@1" in text and "train step" not in text
    written = [n for _, _, names in os.walk(logs / "ev") for n in names if n.endswith(".pt")]
    assert written == []
    # --t-eval: the teacher first, in its own format, then training
    assert main(common + ["--name", "tev", "--teacher", "tiny-teacher", "--teacher-pretrained", kd["teacher"],
                          "--t-eval", "--epochs", "1", "--warmup", "1", "--max-steps", "1"]) == 0
    assert "teacher_eval step 0 | retrieval/image_to_text_R@1" in (logs / "tev" / "out.log").read_text()


# ---- locked towers: unlocked groups, frozen norm statistics -------------------------------------------------------
def test_locked_towers_leave_open_clips_last_groups_trainable():
    torch.manual_seed(0)
    clip = create_student(ModelConfig(model="tiny-student", lock_image=True, lock_image_unlocked_groups=2,
                                      lock_text=True, lock_text_unlocked_layers=1), torch.device("cpu")).model
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    # open_clip's image groups: [embeddings + ln_pre], resblocks[:-1], [last resblock + ln_post], proj
    expected = {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias", "text_projection", "logit_scale"}
    expected |= {n for n, _ in clip.named_parameters() if n.startswith("visual.transformer.resblocks.1.")}
    assert trainable == expected
    _, loss = _student_and_loss()
    in_groups = {id(p) for g in param_groups(clip, loss, 0.1) for p in g["params"]}
    assert in_groups == {id(p) for p in clip.parameters() if p.requires_grad} | {id(p) for p in loss.parameters()}


def test_lock_image_freeze_bn_stats_freezes_the_locked_batchnorms():
    from training.parallel.ddp import sync_batchnorm

    torch.manual_seed(0)
    clip = create_student(ModelConfig(model="timm-resnet18", lock_image=True, lock_image_unlocked_groups=1,
                                      lock_image_freeze_bn_stats=True), torch.device("cpu")).model
    norms = {n: m for n, m in clip.visual.named_modules() if "BatchNorm" in type(m).__name__}
    live = sorted(n for n, m in norms.items() if isinstance(m, torch.nn.BatchNorm2d))
    assert live == ["trunk.layer4.1.bn1", "trunk.layer4.1.bn2"]  # the unlocked group keeps learning its statistics
    frozen = {n: m for n, m in norms.items() if n not in live}
    assert len(frozen) == 18 and all("Frozen" in type(m).__name__ for m in frozen.values())
    before = {n: m.running_mean.clone() for n, m in frozen.items()}
    clip.train()
    clip.encode_image(torch.randn(2, 3, 224, 224))
    assert all(torch.equal(before[n], m.running_mean) for n, m in frozen.items())
    # --use-bn-sync converts only the live BatchNorms
    synced = sync_batchnorm(clip, torch.device("cuda"))
    kinds = {n: type(m).__name__ for n, m in synced.visual.named_modules() if n in norms}
    assert {kinds[n] for n in live} == {"SyncBatchNorm"} and all("Frozen" in kinds[n] for n in frozen)


def test_a_locked_run_changes_only_the_unlocked_weights(world):
    assert main(_argv(world, "locked", "--lock-image", "--lock-image-unlocked-groups", "1", "--epochs", "1")) == 0
    final = torch.load(world["root"] / "logs" / "locked" / "checkpoints" / "epoch_1.pt", weights_only=True)["model"]
    torch.manual_seed(0)  # the trainer seeds with --seed (0) right before it builds the student
    init = create_student(ModelConfig(model="tiny-student"), torch.device("cpu")).model.state_dict()
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    assert "visual.proj" in changed and any(k.startswith("transformer.") for k in changed)  # text tower trains
    assert not {k for k in changed if k.startswith("visual.") and k != "visual.proj"}


def test_open_clips_create_model_options_reach_the_student():
    import open_clip
    from open_clip.transformer import QuickGELU

    clip = create_student(ModelConfig(model="tiny-student", force_quick_gelu=True, force_custom_text=True),
                          torch.device("cpu")).model
    assert isinstance(clip, open_clip.CustomTextCLIP)
    assert any(isinstance(m, QuickGELU) for m in clip.visual.modules())
    plain = create_student(ModelConfig(model="tiny-student"), torch.device("cpu")).model
    assert type(plain) is open_clip.CLIP and not any(isinstance(m, QuickGELU) for m in plain.modules())
