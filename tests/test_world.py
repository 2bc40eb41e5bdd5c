"""The embedded demo world: determinism, on-disk formats, captions that match the pixels, zero-shot set, reruns."""

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.demo import world as W
from training.demo.world import generate_world, main

SMALL = {"num_train": 24, "num_distill": 10, "num_val": 8, "num_zeroshot_per_class": 3}
SIZE = 32  # the default image size


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a world (relative path -> bytes), the lock file aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".world.lock"
    }


def _rows(csv_path: str) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def small_world(module_tmp_path):
    return generate_world(module_tmp_path, seed=3, **SMALL)


def test_determinism(tmp_path):
    a = generate_world(tmp_path / "a", seed=7, **SMALL)
    b = generate_world(tmp_path / "b", seed=7, **SMALL)
    c = generate_world(tmp_path / "c", seed=8, **SMALL)
    fa, fb, fc = _files(Path(a.root)), _files(Path(b.root)), _files(Path(c.root))
    assert fa == fb
    assert fa.keys() == fc.keys()
    images = [k for k in fa if k.endswith(".jpg")]
    assert len(images) == 24 + 8 + 3 * len(W.SHAPES)
    assert sum(fa[k] != fc[k] for k in images) == len(images)  # another seed: every image differs
    assert fa["train.csv"] != fc["train.csv"]
    assert fa["distill.csv"] == b"".join(fa["train.csv"].splitlines(keepends=True)[:11])  # header + 10 rows


def test_scenes_are_a_pure_function_of_seed_split_index():
    """The same (seed, split, index) gives the same scene and the same pixels, whatever was generated before."""
    later = [W.make_scene(5, "train", i) for i in range(30)]
    W.make_scene(5, "val", 3)
    again = [W.make_scene(5, "train", i) for i in reversed(range(30))][::-1]
    assert [s.caption for s in later] == [s.caption for s in again]
    assert all(np.array_equal(np.asarray(W.render_scene(a, SIZE)), np.asarray(W.render_scene(b, SIZE)))
               for a, b in zip(later[:5], again[:5]))
    assert len({s.caption for s in later}) > 10


def test_csv_format(small_world):
    assert small_world.data_root == small_world.root
    for csv_path, split, n in [(small_world.train_csv, "train", 24), (small_world.distill_csv, "train", 10),
                               (small_world.val_csv, "val", 8)]:
        with open(csv_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert lines[0] == "filepath\ttitle"
        assert len(lines) == n + 1
        for i, line in enumerate(lines[1:]):
            path, caption = line.split("\t")  # exactly two columns, no stray tabs
            assert path == f"images/{split}/{i:06d}.jpg" and not os.path.isabs(path)
            assert caption.strip() == caption and len(caption) > 10
            img = Image.open(os.path.join(small_world.data_root, path))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert len(list(Path(small_world.root, "images", "train").iterdir())) == 24  # distill.csv reuses train images
    assert len(list(Path(small_world.root, "images", "val").iterdir())) == 8


def test_image_size_option(tmp_path):
    w = generate_world(tmp_path, seed=0, num_train=2, num_distill=1, num_val=1, image_size=48,
                       num_zeroshot_per_class=1)
    assert Image.open(Path(w.root, _rows(w.train_csv)[0]["filepath"])).size == (48, 48)
    assert Image.open(next(Path(w.zeroshot_dir, "star").glob("*.jpg"))).size == (48, 48)


def _words(text: str) -> set[str]:
    return set(text.replace(",", " ").split())


def _check_caption(scene: W.Scene) -> None:
    words = _words(scene.caption)
    (obj,) = scene.objects
    assert obj.shape in words, (scene.caption, obj)
    assert ("size" in scene.named) == (obj.size in words)
    assert ("position" in scene.named) == any(p in scene.caption for p in W.POSITION_PHRASES[obj.position])
    vocabulary = set(W.SHAPES) | set(W.COLORS) | set(W.SIZES) | set(W.TEXTURES)
    named = {obj.shape} | ({obj.size} if "size" in scene.named else set())
    assert words & vocabulary == named  # colour and texture are never named; nothing undrawn is named
    assert set(scene.named) <= set(W.NAMED_ATTRIBUTES)


def _dominant_color(pixels: np.ndarray, contrast: tuple[int, int, int]) -> str:
    """Most frequent palette colour among ``pixels`` [N,3], ignoring the texture's contrast colour and blends."""
    names = [*W.COLORS, "_contrast"]
    palette = np.array([*W.COLORS.values(), contrast], dtype=np.float32)
    d = ((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1)
    pure = d.min(1) < 45**2  # pixels blended across a stripe/dot edge match no palette colour
    votes = Counter(names[k] for k in d.argmin(1)[pure] if names[k] != "_contrast")
    return votes.most_common(1)[0][0]


def test_captions_match_what_is_drawn(small_world):
    rows = _rows(small_world.train_csv)
    for i, row in enumerate(rows):
        scene = W.make_scene(3, "train", i)
        assert scene.caption == row["title"]
        _check_caption(scene)
        pixels = np.asarray(Image.open(Path(small_world.root, row["filepath"])).convert("RGB"))
        for obj in scene.objects:
            mask = W.object_mask(obj, SIZE)
            assert mask.sum() > 20
            inside = pixels[mask]
            assert _dominant_color(inside, W.contrast_color(obj.color)) == obj.color, (row["title"], obj)
            if obj.texture == "solid":
                err = np.abs(inside.mean(0) - np.array(W.COLORS[obj.color])).max()
                assert err < 30, (row["title"], obj, inside.mean(0))


def test_known_scene_pixels():
    """A hand-built scene: the object's colour is at its centre, the background elsewhere."""
    obj = W.WorldObject(shape="square", color="blue", size="large", texture="solid", position="centre",
                        cx=0.5, cy=0.5, radius=0.18, angle=0.0, pattern_angle=0.0, pattern_phase=0.0)
    scene = W.Scene(objects=[obj], background=(150, 150, 150), gradient=(0.0, 0.0), extra={"noise_seed": 0})
    a = np.asarray(W.render_scene(scene, 64)).astype(int)
    assert np.abs(a[28:36, 28:36].mean((0, 1)) - np.array(W.COLORS["blue"])).max() < 6
    assert np.abs(a[:8, :8].mean((0, 1)) - 150).max() < 6
    ring = W.WorldObject(**{**obj.__dict__, "shape": "ring", "texture": "striped", "color": "red"})
    a = np.asarray(W.render_scene(W.Scene([ring], (150, 150, 150), (0.0, 0.0), extra={"noise_seed": 0}), 64))
    assert np.abs(a[30:34, 30:34].astype(int) - 150).mean() < 10  # the ring's hole shows the background


def test_scene_invariants():
    shapes, named = Counter(), Counter()
    for i in range(400):
        scene = W.make_scene(0, "train", i)
        _check_caption(scene)
        (o,) = scene.objects
        shapes[o.shape] += 1
        named.update(scene.named)
        lo, hi = W._RADIUS[o.size]
        assert lo <= o.radius <= hi
        assert 0 <= o.cx - W._BOUND * o.radius and o.cx + W._BOUND * o.radius <= 1
        assert 0 <= o.cy - W._BOUND * o.radius and o.cy + W._BOUND * o.radius <= 1
        side = {"left": o.cx < 0.5 - 0.06, "right": o.cx > 0.5 + 0.06, "top": o.cy < 0.5 - 0.06,
                "bottom": o.cy > 0.5 + 0.06, "centre": abs(o.cx - 0.5) < 0.05 and abs(o.cy - 0.5) < 0.05}
        assert side[o.position], o
    assert set(shapes) == set(W.SHAPES) and min(shapes.values()) > 25  # roughly balanced classes
    assert 0.65 < named["size"] / 400 < 0.85 and 0.65 < named["position"] / 400 < 0.85  # attribute_prob 0.75
    assert all(W.make_scene(0, "train", i, attribute_prob=0.0).caption.split()[-1] in W.SHAPES for i in range(20))
    assert all(set(W.make_scene(0, "train", i, attribute_prob=1.0).named) == set(W.NAMED_ATTRIBUTES)
               for i in range(20))


def test_zeroshot_set(small_world):
    zs = Path(small_world.zeroshot_dir)
    folders = sorted(p.name for p in zs.iterdir() if p.is_dir())
    classnames = (zs / "classnames.txt").read_text().splitlines()
    assert classnames == folders == list(W.SHAPES) == small_world.classnames
    templates = (zs / "templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)
    assert "a photo of a circle." in [t.format("circle") for t in templates]
    assert templates == list(W.ZEROSHOT_TEMPLATES)
    for folder in folders:
        files = sorted((zs / folder).glob("*.jpg"))
        assert len(files) == 3
        for f in files:
            scene = W.make_scene(3, "zeroshot", int(f.stem), shape=folder)
            assert [o.shape for o in scene.objects] == [folder]
            pixels = np.asarray(Image.open(f).convert("RGB"))
            obj = scene.objects[0]
            assert _dominant_color(pixels[W.object_mask(obj, SIZE)], W.contrast_color(obj.color)) == obj.color
    assert small_world.num_zeroshot == 3 * len(W.SHAPES)


def test_noop_rerun_and_regeneration(tmp_path):
    root = tmp_path / "w"
    first = generate_world(root, seed=1, **SMALL)
    assert first.generated
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    (root / "notes.txt").write_text("mine")  # a user's file in the folder is never touched

    again = generate_world(root, seed=1, **SMALL)
    assert not again.generated and again.as_dict() | {"generated": True, "seconds": 0} == first.as_dict() | {
        "seconds": 0}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    before = _files(root)
    forced = generate_world(root, seed=1, overwrite=True, **SMALL)
    assert forced.generated and _files(root) == before  # regenerated, identical bytes

    smaller = generate_world(root, seed=1, num_train=5, num_distill=5, num_val=2, num_zeroshot_per_class=1)  # other parameters
    assert smaller.generated
    assert len(list((root / "images" / "train").iterdir())) == 5  # no stale images left behind
    assert len(_rows(smaller.train_csv)) == 5 and len(_rows(smaller.val_csv)) == 2
    assert all(len(list(p.glob("*.jpg"))) == 1 for p in (root / "zeroshot").iterdir() if p.is_dir())

    (root / W.MARKER).unlink()  # an incomplete world (no marker) is generated again
    assert generate_world(root, seed=1, num_train=5, num_distill=5, num_val=2, num_zeroshot_per_class=1).generated
    assert (root / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "w"), "--seed", "2", "--num-train", "4", "--num-distill", "2", "--num-val", "2",
            "--num-zeroshot-per-class", "1", "--image-size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "generated" in out[0] and "4 train" in out[0] and "--data-root" in out[0]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "up to date" in out[0]
    assert Image.open(tmp_path / "w" / "images" / "train" / "000000.jpg").size == (32, 32)
    assert main(["--out", str(tmp_path / "x"), "--image-size", "8"]) == 2


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_world(tmp_path, image_size=8)
    with pytest.raises(ValueError):
        generate_world(tmp_path, seed=-1)
    with pytest.raises(ValueError):
        generate_world(tmp_path, num_train=-1)
    with pytest.raises(ValueError):
        generate_world(tmp_path, num_train=4, num_distill=5)
    with pytest.raises(ValueError):
        generate_world(tmp_path, attribute_prob=1.5)


@pytest.mark.parametrize("arch", ["demo-teacher", "demo-student"])
def test_captions_fit_the_context_length(arch):
    import open_clip

    import training  # noqa: F401  (registers the demo configs)

    tok = open_clip.get_tokenizer(arch)
    assert tok.context_length == 16
    captions = [W.make_scene(s, split, i, attribute_prob=1.0).caption
                for s in range(2) for split in ("train", "val") for i in range(300)]
    captions.append("a picture of a large triangle in the middle")  # the longest prefix, words and phrase
    captions += [t.format(c) for t in W.ZEROSHOT_TEMPLATES for c in W.SHAPES]
    longest = max(len(tok.encode(c)) + 2 for c in captions)  # + start/end of text
    assert longest <= 16, longest
