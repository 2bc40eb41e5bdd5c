"""Metrics against hand-computed values on crafted embeddings."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from test_eval_support import (
    CRAFT_CLASSES,
    CRAFT_LABELS,
    CRAFT_MPCR,
    CRAFT_TOP1,
    CRAFT_TOP5,
    FakeClip,
    FakeTokenizer,
    FakeTransform,
    craft_model,
    craft_tables,
    write_cifar,
    write_folder,
)
from training.eval import datasets as D
from training.eval import linear_probe as LP
from training.eval.report import build_rows, draw_chart, to_markdown, write_report
from training.eval.results import flat_metrics, make_record, read_records, write_record
from training.eval.retrieval import retrieval_hits, retrieval_metrics
from training.eval.zeroshot import build_classifier, classification_counts, metrics_from_counts, run_zeroshot

CPU = torch.device("cpu")


def test_zeroshot_counts_by_hand():
    images, texts = craft_tables()
    logits = F.normalize(images, dim=-1) @ texts.T
    m = metrics_from_counts(classification_counts(logits, torch.tensor(CRAFT_LABELS), 6))
    assert m["top1"] == pytest.approx(CRAFT_TOP1)
    assert m["top5"] == pytest.approx(CRAFT_TOP5)
    assert m["mean_per_class_recall"] == pytest.approx(CRAFT_MPCR)
    assert m["num_samples"] == 6


def test_zeroshot_end_to_end_on_a_folder(tmp_path):
    write_folder(tmp_path, CRAFT_CLASSES, list(zip(CRAFT_LABELS, range(6))))
    ds = D.load_classification(D.parse_dataset_specs(f"folder={tmp_path}")[0])
    model, tok = craft_model()
    for bs in (1, 4, 64):
        m = run_zeroshot(model, tok, ds, FakeTransform(), CPU, batch_size=bs)
        assert (m["top1"], m["top5"]) == (pytest.approx(CRAFT_TOP1), pytest.approx(CRAFT_TOP5))
        assert m["mean_per_class_recall"] == pytest.approx(CRAFT_MPCR)


def test_classifier_is_mean_of_normalised_template_embeddings_renormalised():
    # two templates per class with different embeddings: the class row is normalize(mean(normalize(t_i)))
    names = ["x0", "x1", "y0", "y1"]
    table = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    model, tok = FakeClip(torch.eye(2), table), FakeTokenizer(names)
    w = build_classifier(model, tok, ["x", "y"], ["{}0", "{}1"], CPU)
    expected = F.normalize(torch.stack([F.normalize(table[[0, 1]], dim=-1).mean(0),
                                        F.normalize(table[[2, 3]], dim=-1).mean(0)]), dim=-1)
    assert torch.allclose(w, expected, atol=1e-6)


def test_retrieval_by_hand_every_block_size():
    e = torch.eye(4)
    images = e[:3]
    t4 = F.normalize(torch.tensor([0.5, 0.6, 0.1, 0.0]), dim=0)
    texts = torch.stack([e[0], e[3], F.normalize(0.9 * e[0] + 0.1 * e[1], dim=0), e[1], t4, e[1]])
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    # text->image ranks: 0, 2 (tie with all), 1, 0, 2, 2 ; image->text ranks: 0, 1, 0
    for block in (1, 2, 1024):
        m = retrieval_metrics(images, texts, t2i, block=block)
        assert m["text_to_image_R@1"] == pytest.approx(2 / 6)
        assert m["text_to_image_R@5"] == m["text_to_image_R@10"] == 1.0
        assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
        assert m["image_to_text_R@5"] == 1.0
    hits = retrieval_hits(images, texts, t2i, torch.arange(3), torch.arange(6), ks=(1, 2, 3))
    assert hits.tolist() == [[2, 3, 3], [2, 3, 6]]


def test_collapsed_model_scores_zero_not_hundred():
    logits = torch.zeros(4, 3)
    m = metrics_from_counts(classification_counts(logits, torch.tensor([0, 1, 2, 0]), 3), ks=(1, 5))
    assert m["top1"] == 0.0 and m["top5"] == 1.0
    feats = F.normalize(torch.ones(3, 2), dim=-1)
    r = retrieval_metrics(feats, feats.repeat(2, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert r["image_to_text_R@1"] == 0.0 and r["text_to_image_R@1"] == 0.0


# ---- linear probe -------------------------------------------------------------------------------------------------

def test_logistic_regression_separates_and_sweep_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 8, generator=g)
    yt = torch.arange(30) % 3
    xt = centers[yt] + torch.randn(30, 8, generator=g)
    a = LP.linear_probe_from_features(x, y, xt, yt, 3, wd_grid=(1e-4, 1e-2, 1.0), max_iter=200)
    b = LP.linear_probe_from_features(x, y, xt, yt, 3, wd_grid=(1e-4, 1e-2, 1.0), max_iter=200)
    assert a == b
    assert a["top1"] >= 0.95 and a["weight_decay"] in (1e-4, 1e-2, 1.0) and a["val_top1"] >= 0.9
    w, bias = LP.fit_logistic(x, y, 3, wd=1e-3, max_iter=200)
    assert ((x @ w + bias).argmax(1) == y).float().mean() >= 0.95


def test_linear_probe_on_cifar_with_feature_cache(tmp_path, monkeypatch):
    # 4 classes, image id = class except one test image that looks like class 2: top-1 exactly 7/8
    train = [(y, y) for y in range(4)] * 5
    test = [(y, y) for y in range(4)] * 2
    test[-1] = (3, 2)
    write_cifar(tmp_path / "c", True, test, train_items=train, classnames=[f"c{i}" for i in range(10)])
    sp = D.parse_dataset_specs(f"cifar10={tmp_path / 'c'}")[0]
    tr, te = D.load_classification(sp, "train"), D.load_classification(sp, "test")
    model = FakeClip(torch.eye(6)[:4] + 0.01, torch.eye(6))
    cache = str(tmp_path / "cache")
    kw = dict(model_id="fake-1", cache_dir=cache, wd_grid=(1e-5, 1e-3), max_iter=100)
    m = LP.run_linear_probe(model, tr, te, FakeTransform(), CPU, **kw)
    assert m["top1"] == pytest.approx(7 / 8) and m["num_train"] == 20
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(LP.cache_path(cache, "fake-1", s, FakeTransform()))
                                                for s in (tr, te)])

    def boom(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(LP, "encode_images", boom)
    assert LP.run_linear_probe(model, tr, te, FakeTransform(), CPU, **kw) == m
    with pytest.raises(AssertionError, match="cache"):  # another model id misses the cache
        LP.run_linear_probe(model, tr, te, FakeTransform(), CPU, **{**kw, "model_id": "fake-2"})


# ---- results and report ----------------------------------------------------------------------------------------------

def test_clip_benchmark_json_and_retention_report(tmp_path):
    s_zs = make_record("zeroshot", "cifar10", "tiny-student", "s.pt", {"top1": 0.7678, "top5": 0.9, "num_samples": 10},
                       kind="cifar10")
    t_zs = make_record("zeroshot", "cifar10", "tiny-teacher", "t.pt", {"top1": 0.8983, "top5": 0.95}, kind="cifar10")
    s_v2 = make_record("zeroshot", "imagenetv2", "s", "", {"top1": 0.0617}, kind="imagenetv2")
    t_v2 = make_record("zeroshot", "imagenetv2", "t", "", {"top1": 0.5579}, kind="imagenetv2")
    s_ret = make_record("retrieval", "coco", "s", "", {"image_to_text_R@1": 0.2, "text_to_image_R@1": 0.1,
                                                       "image_to_text_R@5": 0.4, "text_to_image_R@5": 0.3}, kind="coco")
    t_ret = make_record("retrieval", "coco", "t", "", {"image_to_text_R@1": 0.4, "text_to_image_R@1": 0.2,
                                                       "image_to_text_R@5": 0.8, "text_to_image_R@5": 0.6}, kind="coco")
    assert s_zs["task"] == "zeroshot_classification" and s_zs["metrics"] == {"acc1": 0.7678, "acc5": 0.9}
    assert s_zs["details"]["num_samples"] == 10
    assert s_ret["metrics"]["text_retrieval_recall@1"] == 0.2 and s_ret["metrics"]["image_retrieval_recall@1"] == 0.1
    assert flat_metrics(s_ret)["retrieval/coco/image_to_text_R@1"] == 0.2
    write_record(str(tmp_path / "s"), s_zs)
    assert read_records(str(tmp_path / "s")) == [s_zs]

    rows = build_rows([s_zs, s_v2, s_ret], [t_zs, t_v2, t_ret])
    assert [r.section for r in rows] == ["zeroshot", "shift"] + ["retrieval"] * 4
    assert rows[0].retention == pytest.approx(85.47, abs=0.01) and rows[1].retention == pytest.approx(11.06, abs=0.01)
    md = to_markdown(rows, "student", "teacher", params=(151.3, 66.1))
    assert "| metric | teacher | student | retention % |" in md
    assert "| CIFAR-10 | 89.83 | 76.78 | 85.47 |" in md
    assert "| Parameters (M) ↓ | 151.3 | 66.1 | 43.69 |" in md
    assert "| *Average* | | | 50.00 |" in md  # the four retrieval rows all retain 50 %
    paths = write_report(str(tmp_path / "out"), [s_zs, s_v2, s_ret], [t_zs, t_v2, t_ret], "s", "t")
    with open(paths["chart"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_falls_back_to_pil(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    s = make_record("zeroshot", "cifar10", "s", "", {"top1": 0.5}, kind="cifar10")
    t = make_record("zeroshot", "cifar10", "t", "", {"top1": 0.8}, kind="cifar10")
    path = draw_chart(build_rows([s], [t]), str(tmp_path / "c.png"))
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
