"""One process and two processes (gloo, spawn) give exactly the same numbers."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_eval_support import (
    CRAFT_CLASSES,
    CRAFT_LABELS,
    CRAFT_TOP1,
    RET_T2I,
    FakeClip,
    FakeTransform,
    craft_model,
    ret_model,
    write_cifar,
    write_folder,
    write_karpathy,
    write_retrieval_csv,
    write_wds,
)

CPU = torch.device("cpu")


def evaluator(args: argparse.Namespace):
    from training.config import Config
    from training.eval.hook import TrainingEvaluator

    c = Config.from_args(args)
    return TrainingEvaluator(c.eval, c.data, c.runtime, c.optim.epochs)


def make_data(root: str) -> None:
    # 7 images: the crafted 6 plus one more, so the two ranks hold 4 and 3
    write_folder(os.path.join(root, "zs"), CRAFT_CLASSES, list(zip(CRAFT_LABELS, range(6))) + [(0, 0)])
    items = [(c, i) for c, i in zip(CRAFT_LABELS, range(6))] + [(0, 0)]
    write_wds(os.path.join(root, "wds1"), CRAFT_CLASSES, [items])                          # 1 shard: split by sample
    write_wds(os.path.join(root, "wds3"), CRAFT_CLASSES, [items[s::3] for s in range(3)])  # 3 shards: split by shard
    write_karpathy(os.path.join(root, "coco"))
    write_retrieval_csv(os.path.join(root, "csv"))
    train = [(y, y) for y in range(4)] * 5
    test = [(y, y) for y in range(4)] * 2 + [(3, 2)]
    write_cifar(os.path.join(root, "cifar"), True, test, train_items=train, classnames=[f"c{i}" for i in range(10)])


def run_suite(root: str) -> dict:
    from training.eval import datasets as D
    from training.eval.linear_probe import run_linear_probe
    from training.eval.retrieval import run_retrieval
    from training.eval.zeroshot import run_zeroshot
    out = {}
    model, tok = craft_model()
    for name in ("zs", "wds1", "wds3"):
        ds = D.load_classification(D.parse_dataset_specs(os.path.join(root, name))[0])
        out[name] = run_zeroshot(model, tok, ds, FakeTransform(), CPU, batch_size=2)
    rmodel, rtok = ret_model()
    ds = D.load_retrieval(D.parse_dataset_specs(os.path.join(root, "coco", "dataset_coco.json"))[0])
    out["coco"] = run_retrieval(rmodel, rtok, ds, FakeTransform(), CPU, batch_size=3)
    sp = D.parse_dataset_specs(os.path.join(root, "cifar"))[0]
    lp_model = FakeClip(torch.eye(6)[:4] + 0.01, torch.eye(6))
    out["lp"] = run_linear_probe(lp_model, D.load_classification(sp, "train"), D.load_classification(sp, "test"),
                                 FakeTransform(), CPU, model_id="m", cache_dir=None, wd_grid=(1e-5, 1e-3, 1e-1),
                                 max_iter=100)
    args = argparse.Namespace(zeroshot_data=os.path.join(root, "zs"), zeroshot_frequency=1, val_data=None,
                              val_frequency=1, epochs=2, batch_size=2, workers=0, precision="fp32",
                              eval_datasets=f"shards={os.path.join(root, 'wds3')}", eval_frequency=2)
    out["train_e1"] = evaluator(args)(model, FakeTransform(), tok, 1, CPU)
    args.val_data, args.data_root = os.path.join(root, "csv", "val.csv"), os.path.join(root, "csv")
    out["train_ret"] = evaluator(argparse.Namespace(
        **{**vars(args), "zeroshot_data": None, "eval_datasets": None}))(rmodel, FakeTransform(), rtok, 2, CPU)
    return out


def _worker(rank: int, world: int, root: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        result = run_suite(root)
        dist.barrier()  # no rank tears gloo down while its peer is still in the suite's last collective
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(root, f"result.{rank}.pt"))


def test_one_and_two_processes_agree(tmp_path):
    root = str(tmp_path)
    make_data(root)
    single = run_suite(root)
    assert single["zs"]["num_samples"] == 7 and single["zs"]["top1"] == (CRAFT_TOP1 * 6 + 1) / 7
    assert single["wds1"] == single["wds3"] == single["zs"]
    assert single["coco"]["text_to_image_R@1"] == RET_T2I[1]
    assert single["lp"]["top1"] == 8 / 9
    assert single["train_e1"] == {f"zeroshot/{k}": single["zs"][k] for k in ("top1", "top5", "mean_per_class_recall")}
    assert single["train_ret"]["retrieval/text_to_image_R@1"] == RET_T2I[1]
    mp.spawn(_worker, args=(2, root), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(os.path.join(root, f"result.{rank}.pt"), weights_only=False) == single


def test_in_training_frequency_and_suite_names(tmp_path):
    root = str(tmp_path)
    write_folder(os.path.join(root, "zs"), CRAFT_CLASSES, list(zip(CRAFT_LABELS, range(6))))
    write_retrieval_csv(os.path.join(root, "csv"))
    model, tok = craft_model()
    model.train()
    args = argparse.Namespace(zeroshot_data=os.path.join(root, "zs"), zeroshot_frequency=2,
                              val_data=os.path.join(root, "csv", "val.csv"), val_frequency=0,
                              data_root=os.path.join(root, "csv"), csv_img_key="filepath", csv_caption_key="title",
                              csv_separator="\t", epochs=3, batch_size=4, workers=0, precision="fp32",
                              eval_datasets=f"mine={os.path.join(root, 'zs')}", eval_frequency=1)
    m1 = evaluator(args)(model, FakeTransform(), tok, 1, "cpu")
    assert set(m1) == {"zeroshot/mine/top1", "zeroshot/mine/top5", "zeroshot/mine/mean_per_class_recall"}
    assert model.training  # training mode restored
    m2 = evaluator(args)(model, FakeTransform(), tok, 2, "cpu")
    assert m2["zeroshot/top1"] == CRAFT_TOP1 == m2["zeroshot/mine/top1"]
    m3 = evaluator(args)(model, FakeTransform(), tok, 3, "cpu")  # the last epoch always evaluates
    assert "zeroshot/top1" in m3 and not any(k.startswith("retrieval/") for k in m3)
    rmodel, rtok = ret_model()
    args.val_frequency, args.zeroshot_data, args.eval_datasets = 1, None, None
    m = evaluator(args)(rmodel, FakeTransform(), rtok, 1, "cpu")
    assert m["retrieval/image_to_text_R@1"] == 1.0 and m["retrieval/text_to_image_R@1"] == RET_T2I[1]
    assert set(m) == {f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
