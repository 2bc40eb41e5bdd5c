"""Every on-disk format is read with the right labels, class names, templates and class subsets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from open_clip import IMAGENET_CLASSNAMES

from test_eval_support import (
    RET_I2T,
    RET_T2I,
    FakeClip,
    FakeTokenizer,
    FakeTransform,
    id_image,
    ret_model,
    write_cifar,
    write_folder,
    write_karpathy,
    write_pets,
    write_retrieval_csv,
    write_stl10,
    write_wds,
)
from training.eval import datasets as D
from training.eval.retrieval import run_retrieval
from training.eval.templates import imagenet_subset_wnids, imagenet_wnids
from training.eval.zeroshot import run_zeroshot

CPU = torch.device("cpu")


def identity_model(num_classes: int, dim: int | None = None):
    """Image id i -> e_i, class c -> e_c: an image is predicted as the class equal to its id."""
    dim = dim or num_classes
    e = torch.eye(dim)
    return FakeClip(e, e[:num_classes])


def zeroshot(ds, model, names=None, templates=None):
    if templates is not None:
        ds.templates = templates
    return run_zeroshot(model, FakeTokenizer(names or ds.classnames), ds, FakeTransform(), CPU, batch_size=4)


def spec(kind, path, name=None):
    return D.DatasetSpec(name or kind, kind, str(path))


# ---- ImageNet family ----------------------------------------------------------------------------------------------

def test_shipped_wnids_are_the_sorted_imagenet_list_and_match_timm_subsets():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) == len(IMAGENET_CLASSNAMES)
    assert wnids == sorted(wnids) and wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    import timm.data

    info = os.path.join(os.path.dirname(timm.data.__file__), "_info")
    for sub in ("imagenet_r", "imagenet_a"):
        with open(os.path.join(info, f"{sub}_synsets.txt")) as f:
            subset = f.read().split()
        with open(os.path.join(info, f"{sub}_indices.txt")) as f:
            expected = [int(v) for v in f.read().split()]
        assert D.imagenet_index_map(subset, wnids) == expected
        assert imagenet_subset_wnids(sub.replace("_", "-")) == subset  # the lists shipped for detection


def _wnid_folders(root, indices, per_class=1, image_ids=None):
    wnids = imagenet_wnids()
    for k, idx in enumerate(indices):
        os.makedirs(root / wnids[idx], exist_ok=True)
        for j in range(per_class):
            id_image(idx if image_ids is None else image_ids[k]).save(root / wnids[idx] / f"{j}.JPEG", "JPEG",
                                                                      quality=95)


def test_imagenet_val_labels_are_global_wnid_indices(tmp_path):
    root = tmp_path / "imagenet" / "val"
    _wnid_folders(root, [0, 5, 143])
    sp = D.parse_dataset_specs(f"imagenet1k={tmp_path / 'imagenet'}")[0]  # parent holding val/
    ds = D.load_classification(sp)
    assert sorted(ds.source.labels) == [0, 5, 143] and ds.num_classes == 1000 and ds.class_index is None
    assert len(ds.templates) == 80
    m = zeroshot(ds, identity_model(1000), list(IMAGENET_CLASSNAMES), ["{}"])
    assert m["top1"] == 1.0


def test_imagenet_v2_numeric_folders_map_by_integer_not_text_sort(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    folders = [0, 1, 2, 10, 100]  # text sort: 0, 1, 10, 100, 2 -> naive labels would be wrong for 2, 10, 100
    for c in folders:
        os.makedirs(root / str(c))
        id_image(c).save(root / str(c) / "a.jpeg", "JPEG", quality=95)
    assert D.detect_kind(str(root)) is None  # 5 folders are not the ImageNet-V2 layout: never guessed
    ds = D.load_classification(D.parse_dataset_specs(f"imagenetv2={root}")[0])
    assert "5 of ImageNet-V2's 1000 class folders" in " ".join(ds.notes)  # a subset, said out loud
    assert sorted(ds.source.labels) == folders
    assert dict(zip([os.path.basename(os.path.dirname(p)) for p in ds.source.paths], ds.source.labels)) == {
        str(c): c for c in folders}
    m = zeroshot(ds, identity_model(1000), list(IMAGENET_CLASSNAMES), ["{}"])
    assert m["top1"] == 1.0
    # what a text-sorted ImageFolder would have done: labels 0, 1, 4, 2, 3 for folders 0, 1, 2, 10, 100
    text_sorted = sorted(str(c) for c in folders)
    assert [text_sorted.index(str(c)) for c in folders] != folders


@pytest.mark.parametrize("kind", ["imagenet-r", "imagenet-a"])
def test_imagenet_r_a_restrict_logits_to_the_subset(tmp_path, kind):
    subset = [3, 7, 20, 50, 120]
    _wnid_folders(tmp_path, subset)
    ds = D.load_classification(spec(kind, tmp_path))
    assert ds.class_index == subset and ds.num_classes == 5
    assert ds.classnames == [IMAGENET_CLASSNAMES[i] for i in subset]
    assert sorted(ds.source.labels) == list(range(5))
    # image of class k: 0.8 e_k + e_{k+1}; class k+1 is outside the subset, so only the restriction gets it right
    e = torch.eye(1000)
    images = torch.stack([0.8 * e[k] + e[k + 1] for k in range(1000 - 1)] + [e[999]])
    model = FakeClip(images, e)
    assert zeroshot(ds, model, list(IMAGENET_CLASSNAMES), ["{}"])["top1"] == 1.0
    full = D.load_classification(spec("imagenet1k", tmp_path))  # same folders, 1000-way
    assert zeroshot(full, model, list(IMAGENET_CLASSNAMES), ["{}"])["top1"] == 0.0


def test_imagenet_sketch_and_unknown_wnid(tmp_path):
    _wnid_folders(tmp_path / "sketch", [1, 2])
    ds = D.load_classification(spec("imagenet-sketch", tmp_path))
    assert sorted(ds.source.labels) == [1, 2] and ds.num_classes == 1000
    os.makedirs(tmp_path / "bad" / "n99999999")
    id_image(0).save(tmp_path / "bad" / "n99999999" / "x.jpg")
    with pytest.raises(D.DatasetError, match="not ImageNet-1k wnids"):
        D.load_classification(spec("imagenet-r", tmp_path / "bad"))


def _numbered_folders(root, n, images=True):
    for c in range(n):
        os.makedirs(root / str(c))
        if images:
            id_image(c).save(root / str(c) / "a.png")


def test_numbered_folders_are_imagenet_v2_only_with_all_1000(tmp_path):
    # the bug: 10 folders 0..9 were scored as ImageNet-V2 (1000 classes, 80 templates) and reported 0.0
    _numbered_folders(tmp_path / "digits", 10)
    assert D.detect_kind(str(tmp_path / "digits")) is None
    for text in (str(tmp_path / "digits"), f"digits={tmp_path / 'digits'}"):
        with pytest.raises(D.DatasetError) as err:
            D.parse_dataset_specs(text)
        msg = str(err.value)
        assert "10 numbered class folders (0..9)" in msg and "ImageNet-V2" in msg and "\n" not in msg
        assert "add classnames.txt with one class name per line, in sorted folder order" in msg and "KIND=PATH" in msg
    # with class names it is an ordinary folder set, and the detection says so
    with open(tmp_path / "digits" / "classnames.txt", "w") as f:
        f.write("\n".join(f"digit {c}" for c in range(10)) + "\n")
    sp = D.parse_dataset_specs(str(tmp_path / "digits"))[0]
    assert sp.kind == "folder" and "classnames.txt" in sp.detected
    ds = D.load_classification(sp)
    assert ds.num_classes == 10 and ds.classnames[3] == "digit 3" and ds.notes == []
    # past 9 the sorted folder order is text order, and both the error and the loaded set spell it out
    _numbered_folders(tmp_path / "twelve", 12)
    with pytest.raises(D.DatasetError, match=r"in sorted folder order \(as text: 0, 1, 10, 11, \.\.\.\)"):
        D.parse_dataset_specs(str(tmp_path / "twelve"))
    with open(tmp_path / "twelve" / "classnames.txt", "w") as f:
        f.write("\n".join(f"c{c}" for c in range(12)) + "\n")
    ds = D.load_classification(D.parse_dataset_specs(str(tmp_path / "twelve"))[0])
    assert "labels follow the text order of the numbered folders (0, 1, 10, 11, ...)" in ds.notes[0]
    # the full 0..999 layout is ImageNet-V2, with the reason recorded for the log
    _numbered_folders(tmp_path / "v2", 1000, images=False)
    sp = D.parse_dataset_specs(str(tmp_path / "v2"))[0]
    assert sp.kind == "imagenetv2" and "0..999" in sp.detected


def test_wnid_folders_are_detected_only_as_an_exact_benchmark(tmp_path):
    wnids = imagenet_wnids()
    cases = {"in1k": (wnids, "imagenet1k"), "r": (imagenet_subset_wnids("imagenet-r"), "imagenet-r"),
             "a": (imagenet_subset_wnids("imagenet-a"), "imagenet-a"),
             os.path.join("sk", "sketch"): (wnids, "imagenet-sketch")}
    for sub, (folders, _) in cases.items():
        for w in folders:
            os.makedirs(tmp_path / sub / w)
    for sub, (_, kind) in cases.items():
        path = tmp_path / sub.split(os.sep)[0]
        sp = D.parse_dataset_specs(str(path))[0]
        assert sp.kind == kind and sp.detected, (sub, sp)
    # 200 wnids that are neither ImageNet-R's nor ImageNet-A's classes used to pass as imagenet-r
    for w in wnids[:200]:
        os.makedirs(tmp_path / "other" / w)
    assert D.detect_kind(str(tmp_path / "other")) is None
    with pytest.raises(D.DatasetError, match="200 wnid class folders") as err:
        D.parse_dataset_specs(str(tmp_path / "other"))
    assert "ImageNet-R" in str(err.value) and "KIND=PATH" in str(err.value)
    # named explicitly, a subset is read (1000-way, or restricted to the folders present) and said out loud
    _wnid_folders(tmp_path / "few", [3, 7])
    full = D.load_classification(spec("imagenet1k", tmp_path / "few"))
    assert full.num_classes == 1000 and "2 of the 1000 ImageNet class folders" in " ".join(full.notes)
    sub = D.load_classification(spec("imagenet-r", tmp_path / "few"))
    assert sub.num_classes == 2 and "not ImageNet-R's 200 classes" in " ".join(sub.notes)
    a_first = imagenet_subset_wnids("imagenet-a")[0]
    id_image(0).save(tmp_path / "a" / a_first / "x.png")
    exact = D.load_classification(spec("imagenet-a", tmp_path / "a"))  # an exact subset has no note
    assert exact.num_classes == 200 and exact.notes == []


def test_folder_without_classnames(tmp_path):
    # folder names that are no class names (numbers, wnids) are refused; words are used, and that is said
    _numbered_folders(tmp_path / "digits", 3)
    with pytest.raises(D.DatasetError, match="add classnames.txt with one class name per line"):
        D.load_classification(spec("folder", tmp_path / "digits"))
    _wnid_folders(tmp_path / "wnids", [1, 2])
    with pytest.raises(D.DatasetError, match="add classnames.txt"):
        D.load_classification(spec("folder", tmp_path / "wnids"))
    for name in ("golden_retriever", "tabby cat"):
        os.makedirs(tmp_path / "words" / name)
        id_image(0).save(tmp_path / "words" / name / "a.png")
    with pytest.raises(D.DatasetError, match="2 class folders and no classnames.txt") as err:
        D.parse_dataset_specs(str(tmp_path / "words"))  # a bare path is not guessed to be a folder set
    assert "folder=PATH" in str(err.value)
    ds = D.load_classification(D.parse_dataset_specs(f"folder={tmp_path / 'words'}")[0])
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert "class names from the folder names" in " ".join(ds.notes)


# ---- CIFAR, STL-10, Pets -------------------------------------------------------------------------------------------

def test_cifar10_pickle(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    test_items = [(y, y) for y in range(10)] + [(3, 5)]  # the last image looks like a dog but is a cat
    write_cifar(tmp_path, True, test_items, train_items=[(y, y) for y in range(10)] * 2, classnames=names)
    sp = D.parse_dataset_specs(str(tmp_path))[0]
    assert sp.kind == "cifar10" and D.has_train_split(sp)
    ds = D.load_classification(sp)
    assert ds.classnames == names and len(ds.templates) == 18 and ds.source.labels == [y for y, _ in test_items]
    img, y = ds.source.load(4)
    assert img.size == (32, 32) and y == 4
    m = zeroshot(ds, identity_model(10))
    assert m["top1"] == pytest.approx(10 / 11)
    assert m["mean_per_class_recall"] == pytest.approx((9 + 0.5) / 10)
    train = D.load_classification(sp, "train")
    assert len(train.source) == 20 and train.split == "train"


def test_cifar100_pickle_and_meta_names(tmp_path):
    names = [f"class_{i}" for i in range(100)]
    write_cifar(tmp_path, False, [(y, y) for y in range(0, 100, 7)], train_items=[(1, 1)], classnames=names)
    ds = D.load_classification(D.parse_dataset_specs(f"cifar100={tmp_path}")[0])
    assert ds.classnames[5] == "class 5" and ds.num_classes == 100
    assert zeroshot(ds, identity_model(100))["top1"] == 1.0


def test_stl10_binary_orientation_and_labels(tmp_path):
    pattern = np.zeros((1, 96, 96, 3), dtype=np.uint8)
    pattern[0, 10, 50] = (255, 0, 0)  # row 10, column 50
    write_stl10(tmp_path, [(9, 0)], pattern=pattern)
    ds = D.load_classification(spec("stl10", tmp_path))
    img, y = ds.source.load(0)
    assert y == 9 and np.asarray(img)[10, 50].tolist() == [255, 0, 0] and np.asarray(img)[50, 10].sum() == 0
    assert ds.classnames[2] == "car" and len(ds.templates) == 2
    write_stl10(tmp_path / "b", [(y, y) for y in range(10)] + [(0, 1)], train_items=[(0, 0)])
    sp = D.parse_dataset_specs(str(tmp_path / "b"))[0]
    assert sp.kind == "stl10" and D.has_train_split(sp)
    assert zeroshot(D.load_classification(sp), identity_model(10))["top1"] == pytest.approx(10 / 11)


def test_pets_fine_and_coarse(tmp_path):
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2), ("basset_hound", 2)]
    # fine: image id = class index, except one bulldog that looks like a basset hound
    items = [(0, 0), (1, 1), (1, 3), (2, 2), (3, 3)]
    write_pets(tmp_path, breeds, items, trainval_items=[(0, 0)])
    sp = D.parse_dataset_specs(str(tmp_path))[0]
    assert sp.kind == "pets" and D.has_train_split(sp)
    fine = D.load_classification(sp)
    assert fine.classnames[:4] == ["Abyssinian", "american bulldog", "american pit bull terrier", "basset hound"]
    assert fine.num_classes == 37 and fine.source.labels == [0, 1, 1, 2, 3]
    assert fine.templates == ["a photo of a {}, a type of pet."]
    e = torch.eye(37)
    assert zeroshot(fine, FakeClip(e, e))["top1"] == pytest.approx(4 / 5)
    coarse = D.load_classification(spec("pets-coarse", tmp_path))
    assert coarse.classnames == ["cat", "dog"] and coarse.source.labels == [0, 1, 1, 1, 1]
    cat, dog = [1.0, 0.0], [0.0, 1.0]
    assert zeroshot(coarse, FakeClip(torch.tensor([cat, dog, dog, dog]), torch.eye(2)))["top1"] == 1.0


# ---- image folder, WebDataset ----------------------------------------------------------------------------------------

def test_folder_with_classnames_and_templates(tmp_path):
    names = ["red thing", "blue thing", "green thing"]
    write_folder(tmp_path / "zeroshot", names, [(0, 0), (1, 1), (2, 2), (2, 0)])
    sp = D.parse_dataset_specs(f"demo={tmp_path}")[0]  # the demo world's root holds zeroshot/
    assert (sp.name, sp.kind) == ("demo", "folder")
    ds = D.load_classification(sp)
    assert ds.classnames == names and ds.templates == ["a photo of a {}.", "art of the {}."]
    assert ds.source.labels == [0, 1, 2, 2]
    assert zeroshot(ds, identity_model(3))["top1"] == 0.75
    with open(tmp_path / "zeroshot" / "classnames.txt", "w") as f:
        f.write("only one\n")
    with pytest.raises(D.DatasetError, match="1 class names for 3 class folders"):
        D.load_classification(sp)


def test_folder_train_test_split_for_linear_probe(tmp_path):
    write_folder(tmp_path / "train", ["a", "b"], [(0, 0), (1, 1)], templates=None)
    write_folder(tmp_path / "test", ["a", "b"], [(0, 0)], templates=None)
    with open(tmp_path / "classnames.txt", "w") as f:
        f.write("a\nb\n")
    sp = D.parse_dataset_specs(f"folder={tmp_path}")[0]
    assert D.has_train_split(sp)
    assert len(D.load_classification(sp, "train").source) == 2
    test = D.load_classification(sp, "test")
    assert len(test.source) == 1 and len(test.templates) == 80  # no templates.txt: OpenAI's 80


@pytest.mark.parametrize("nshards", [1, 3])
def test_clip_benchmark_webdataset(tmp_path, nshards):
    names = ["cat", "dog", "bird"]
    items = [(0, 0), (1, 1), (2, 2), (2, 1), (0, 0), (1, 1), (2, 2)]
    write_wds(tmp_path, names, [items[s::nshards] for s in range(nshards)])
    sp = D.parse_dataset_specs(str(tmp_path))[0]
    assert sp.kind == "wds"
    ds = D.load_classification(sp)
    assert ds.classnames == names and ds.templates == ["a photo of a {}."]  # CLIP_benchmark's {c} accepted
    seen = [(key, y) for key, _, y in ds.source.iterate(0, 1)]
    assert len(seen) == 7 and len({k for k, _ in seen}) == 7
    m = zeroshot(ds, identity_model(3))
    assert m["top1"] == pytest.approx(6 / 7) and m["num_samples"] == 7


# ---- retrieval sets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coco_style", [True, False])
def test_karpathy_json_test_split_five_captions(tmp_path, coco_style):
    path = write_karpathy(tmp_path, coco_style)
    sp = D.parse_dataset_specs(path)[0]
    assert sp.kind == ("coco" if coco_style else "flickr30k")
    ds = D.load_retrieval(sp)
    assert len(ds.images) == 4 and len(ds.texts) == 20 and ds.text_to_image[:6] == [0, 0, 0, 0, 0, 1]
    model, tok = ret_model()
    m = run_retrieval(model, tok, ds, FakeTransform(), CPU, batch_size=3)
    for k in (1, 5, 10):
        assert m[f"image_to_text_R@{k}"] == pytest.approx(RET_I2T[k])
        assert m[f"text_to_image_R@{k}"] == pytest.approx(RET_T2I[k])


def test_csv_rows_sharing_a_filepath_are_one_image(tmp_path):
    path = write_retrieval_csv(tmp_path)
    ds = D.load_retrieval(D.parse_dataset_specs(path)[0], data_root=str(tmp_path))
    assert len(ds.images) == 4 and [len(c) for c in ds.captions] == [5, 5, 5, 5]
    model, tok = ret_model()
    m = run_retrieval(model, tok, ds, FakeTransform(), CPU)
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == pytest.approx(0.2)
    with pytest.raises(D.DatasetError, match="image not found"):
        D.load_retrieval(D.parse_dataset_specs(path)[0], data_root=str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "nowhere")
    sp = D.parse_dataset_specs(f"val={path}::{tmp_path}")[0]  # a per-dataset image root wins over --data-root
    assert sp.root == str(tmp_path)
    assert len(D.load_retrieval(sp, data_root=str(tmp_path / "nowhere")).images) == 4


def test_spec_parsing_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="path not found"):
        D.parse_dataset_specs(f"cifar10={tmp_path / 'missing'}")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(D.DatasetError, match="unknown dataset 'bogus'"):
        D.parse_dataset_specs(f"bogus={tmp_path / 'empty'}")
    specs = D.parse_dataset_specs([f"IMAGENET_R={tmp_path}", f"imagenet-r={tmp_path}"])
    assert [(s.name, s.kind) for s in specs] == [("IMAGENET_R", "imagenet-r"), ("imagenet-r", "imagenet-r")]
