"""End-to-end training through the real CLI: resume equivalence, 1 vs 2 processes, frozen teacher, export."""

import os
import subprocess
import sys

import open_clip
import pytest
import torch

import training  # noqa: F401
from helpers import free_port, write_image_csv
from training.main import main
from training.models import create_clip


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=24, size=64)
    teacher_path = str(root / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher_path)
    return {"root": root, "csv": csv, "data_root": str(root / "data"), "teacher": teacher_path}


def _argv(world, name, *extra, batch_size=8):
    return ["--model", "tiny-student", "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", str(batch_size),
            "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32", "--workers", "0",
            "--logs", str(world["root"] / "logs"), "--name", name, "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu",
            "--recipe", "clip-kd", *extra]


def _ckpt(world, name, filename):
    return torch.load(world["root"] / "logs" / name / "checkpoints" / filename, weights_only=True)


def _assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("decode", ["workers", "cpu"])
def test_resume_mid_epoch_is_exact(world, decode, capsys):
    # 3 batches per epoch x 2 epochs = 6 steps straight, vs 4 steps, stop, resume latest, 2 more; with
    # --decode-device cpu the trainer decodes and crops (2 loader workers reading the bytes)
    extra = ["--decode-device", decode, "--workers", "2"] if decode != "workers" else []
    straight, resumed = f"straight-{decode}", f"resumed-{decode}"
    assert main(_argv(world, straight, *extra)) == 0
    assert ("decoded and cropped in the trainer on cpu" in capsys.readouterr().out) == (decode == "cpu")
    assert main(_argv(world, resumed, "--max-steps", "4", *extra)) == 0
    assert _ckpt(world, resumed, "step_4.pt")["batch_in_epoch"] == 1
    assert main(_argv(world, resumed, "--resume", "latest", *extra)) == 0
    a, b = _ckpt(world, straight, "epoch_2.pt"), _ckpt(world, resumed, "epoch_2.pt")
    assert a["step"] == b["step"] == 6
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["loss"], b["loss"])


def test_teacher_gets_no_gradient_and_does_not_change(world):
    from training.models import read_state_dict

    before = read_state_dict(world["teacher"])
    assert main(_argv(world, "frozen", "--max-steps", "2")) == 0
    after = read_state_dict(world["teacher"])
    _assert_same_state(before, after)
    ckpt = _ckpt(world, "frozen", "step_2.pt")
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # only the student is saved


def _torchrun(world, name, nproc, batch_size, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "training.main",
           *_argv(world, name, "--max-steps", "4", "--gather-with-grad", *extra, batch_size=batch_size)]
    cmd[cmd.index("--logs")] = "--logs-dir"  # torchrun's parser claims --logs as an abbreviation of --logs-specs
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _ckpt(world, name, "step_4.pt")


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_match_one_at_the_same_global_batch(world, local_loss):
    extra = ["--local-loss"] if local_loss else []
    one = _torchrun(world, f"one-{local_loss}", 1, 8, *extra)
    two = _torchrun(world, f"two-{local_loss}", 2, 4, *extra)
    # Adam turns float-level noise in gradients that are zero in exact arithmetic (e.g. attention key biases) into
    # O(lr) steps, so after several steps we compare whole states by relative distance; the gradients themselves are
    # compared tightly in test_two_processes_give_the_same_loss_and_gradients.
    for part in ("model", "loss"):
        a, b = one[part], two[part]
        assert a.keys() == b.keys()
        diff = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
        norm = sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5
        assert diff / norm < 1e-3, (part, diff / norm)


def _grads_worker(rank, world_size, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training import distributed
    from training.params import parse_config
    from training.train import train_step
    from training.trainer import Trainer

    config = parse_config(argv)
    env = distributed.init_distributed("cpu")
    trainer = Trainer(config, env)
    trainer.data.set_epoch(0)
    batch = next(iter(trainer.data.dataloader))
    trainer.schedule(0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0  # keep the weights: we only want the gradients of the first step
    losses = train_step(trainer, batch)
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in trainer.loss_fn.named_parameters()
                  if p.grad is not None})
    torch.save({"grads": grads, "losses": {k: v.detach() for k, v in losses.items()}}, f"{out}.{rank}")
    distributed.cleanup()


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_give_the_same_loss_and_gradients(world, local_loss, tmp_path):
    import torch.multiprocessing as mp

    results = {}
    for nproc, batch_size in ((1, 8), (2, 4)):
        argv = _argv(world, "", "--gather-with-grad", *(["--local-loss"] if local_loss else []),
                     batch_size=batch_size)
        argv[argv.index("--logs") + 1] = ""
        out = str(tmp_path / f"grads{nproc}.pt")
        mp.spawn(_grads_worker, args=(nproc, free_port(), argv, out), nprocs=nproc, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(nproc)]
        for k in ranks[0]["grads"]:  # DDP already averaged the gradients: every rank holds the same ones
            assert all(torch.equal(ranks[0]["grads"][k], r["grads"][k]) for r in ranks), k
        # with --local-loss each rank reports the loss of its own rows: the global loss is their mean
        losses = {k: sum(r["losses"][k] for r in ranks) / nproc for k in ranks[0]["losses"]}
        results[nproc] = {"grads": ranks[0]["grads"], "losses": losses}
    one, two = results[1], results[2]
    for k in one["losses"]:
        assert torch.allclose(one["losses"][k], two["losses"][k], atol=1e-6, rtol=1e-5), k
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for k in one["grads"]:
        # relative to the tensor's norm: the CPU kernels' reduction order differs with the batch split, so entries
        # near zero differ by ~1e-5 of the largest; a dropped rank or a wrong average is off by O(1) of the norm
        a, b = one["grads"][k], two["grads"][k]
        assert float((a - b).norm()) <= 1e-4 * float(a.norm()) + 1e-7, (k, float((a - b).norm() / a.norm()))


def test_export_loads_in_open_clip_with_the_same_embeddings(world, tmp_path):
    from training.export import main as export_main

    assert main(_argv(world, "export", "--max-steps", "2")) == 0
    ckpt_path = str(world["root"] / "logs" / "export" / "checkpoints" / "step_2.pt")
    for out in (str(tmp_path / "student.pt"), str(tmp_path / "student.safetensors")):
        assert export_main([ckpt_path, out]) == 0
        model, _, preprocess = open_clip.create_model_and_transforms("tiny-student", pretrained=out)
        reference = create_clip("tiny-student", None, torch.device("cpu"))
        reference.load_state_dict(torch.load(ckpt_path, weights_only=True)["model"])
        model.eval()
        reference.eval()
        image = torch.randn(2, 3, 64, 64)
        text = open_clip.get_tokenizer("tiny-student")(["a red square", "a blue square"])
        with torch.no_grad():
            assert torch.allclose(model.encode_image(image), reference.encode_image(image), atol=1e-6)
            assert torch.allclose(model.encode_text(text), reference.encode_text(text), atol=1e-6)
        if out.endswith(".pt"):  # the student's own tensors only: no loss-side heads, no optimizer state
            assert set(torch.load(out, weights_only=True)) == set(reference.state_dict())


@pytest.mark.parametrize("decode", ["workers", "cpu"])
def test_webdataset_resume_mid_epoch_is_exact(world, tmp_path, decode):
    """Shards from the CSV, 2 loader workers: stop mid-epoch, resume from the saved stream positions (also with the
    trainer decoding the shards' JPEG bytes: --decode-device cpu)."""
    from training.data.convert import main as convert_main

    shards = str(tmp_path / "shards")
    assert convert_main([world["csv"], "--out", shards, "--samples-per-shard", "4", "--data-root",
                         world["data_root"], "--no-progress"]) == 0
    pattern = f"{shards}/{{00000..00005}}.tar"
    assert len(os.listdir(shards)) >= 6

    def argv(name, *extra):
        args = _argv(world, name, "--dataset-type", "webdataset", "--train-num-samples", "24", "--workers", "2",
                     "--decode-device", decode, *extra)
        args[args.index("--train-data") + 1] = pattern
        return args

    straight, resumed = f"wds-straight-{decode}", f"wds-resumed-{decode}"
    assert main(argv(straight)) == 0
    assert main(argv(resumed, "--max-steps", "5")) == 0  # mid-epoch 2
    latest = (world["root"] / "logs" / resumed / "checkpoints" / "latest.txt").read_text().strip()
    assert latest == "step_5.pt" and _ckpt(world, resumed, latest)["data_state"] is not None
    assert main(argv(resumed, "--resume", "latest")) == 0
    a, b = _ckpt(world, straight, "epoch_2.pt"), _ckpt(world, resumed, "epoch_2.pt")
    assert a["step"] == b["step"]
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["loss"], b["loss"])
