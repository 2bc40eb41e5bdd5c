"""The uint8 data path: workers render uint8 crops (at a reduced JPEG DCT scale when the crop allows it) and the
trainer normalises on the device; the teacher cache's replayed views stay bit-identical to what the teacher embedded.
Under --decode-device the trainer decodes and crops instead: the same views, pixels within a few grey levels."""

import io
import os
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import training  # noqa: F401
from training import cache_teacher
from training.data.common import DataTransforms, collate, sample_rng
from training.data.csv import CsvDataset, open_image
from training.data.device import BLANKED, BatchDecoder, model_image, normalize_pixels, teacher_image
from training.data.transforms import (
    ImageDecodeError,
    ImageFormat,
    PairedViews,
    SourceImage,
    ViewParams,
    dct_scale,
    render_pixels,
    sample_view,
)
from training.models import _bundle, create_clip
from training.teacher_cache import TeacherCache
from training.teacher_cache import build as cache_build

FMT = ImageFormat(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus texture: a crop box off by a few pixels shows up as a large pixel error."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_device_normalisation_equals_the_old_float_transform():
    pil = Image.fromarray(photo(50, 40))
    reference = TF.normalize(TF.to_tensor(pil), FMT.mean, FMT.std)  # what the workers used to ship
    pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert torch.equal(normalize_pixels(pixels, FMT), reference)
    batch = pixels.unsqueeze(0).repeat(3, 1, 1, 1)
    out = model_image(batch, FMT, torch.device("cpu"), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.expand(3, -1, -1, -1).to(torch.bfloat16))
    floats = torch.randn(2, 3, 8, 8)  # a custom float transform's output is only moved
    assert torch.equal(model_image(floats, None, torch.device("cpu"), torch.float32), floats)


def test_teacher_input_is_the_student_crop_in_its_own_normalisation():
    student, teacher = FMT, ImageFormat(64, (0.5,) * 3, (0.25,) * 3)
    views = PairedViews(student, teacher, train=True, seed=0)
    source = SourceImage(jpeg_bytes(photo(90, 70)))
    sample = views(source)
    assert "teacher_image" not in sample and sample["image"].dtype == torch.uint8  # same size: one crop
    batch = {"image": sample["image"].unsqueeze(0)}
    s = model_image(batch["image"], student, torch.device("cpu"), torch.float32)
    t = teacher_image(batch, s, student, teacher, torch.device("cpu"), torch.float32)
    assert torch.equal(t[0], normalize_pixels(sample["image"], teacher))
    assert teacher_image(batch, s, student, student, torch.device("cpu"), torch.float32) is s
    bigger = PairedViews(student, ImageFormat(96, (0.5,) * 3, (0.25,) * 3), train=True, seed=0)(source)
    assert bigger["teacher_image"].shape == (3, 96, 96) and bigger["teacher_image"].dtype == torch.uint8


@pytest.mark.parametrize("size", [(300, 260), (520, 400), (1100, 900)])
def test_reduced_decode_keeps_the_crop_geometry(size):
    pixels = photo(*size, seed=1)
    source = SourceImage(jpeg_bytes(pixels))
    full = Image.open(io.BytesIO(source.data)).convert("RGB")
    scales = set()
    for i in range(6):
        view = sample_view(*size, random.Random(i), scale=(0.35, 1.0), flip_prob=0.5)
        scale = dct_scale(view, FMT.size)
        scales.add(scale)
        fast = render_pixels(source, view, FMT).float()
        exact = render_pixels(full, view, FMT).float()
        assert fast.shape == exact.shape == (3, 64, 64)
        # another decode, same box: the pixels agree to a few grey levels (a box shifted by 1 output px would not)
        assert (fast - exact).abs().mean() < 3.0, (view, scale)
        shifted = render_pixels(full, ViewParams(view.top, view.left + max(2, view.width // 64), view.height,
                                                 view.width, view.flip), FMT).float()
        assert (fast - exact).abs().mean() < (shifted - exact).abs().mean()
    assert max(scales) > 1  # these sources are decoded at a reduced scale


def test_small_sources_and_non_jpeg_decode_at_full_size():
    view = ViewParams(0, 0, 100, 100)
    assert dct_scale(view, 64) == 1 and dct_scale(ViewParams(0, 0, 128, 200), 64) == 2
    buf = io.BytesIO()
    Image.fromarray(photo(400, 400)).save(buf, format="PNG")
    png = SourceImage(buf.getvalue())
    image, factor = png.at_scale(4)
    assert factor == 1.0 and image.size == (400, 400)
    assert torch.equal(render_pixels(png, ViewParams(0, 0, 400, 400), FMT),
                       render_pixels(Image.open(io.BytesIO(buf.getvalue())), ViewParams(0, 0, 400, 400), FMT))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_reduced_decode_of_grey_and_cmyk_jpegs(mode):
    buf = io.BytesIO()
    Image.fromarray(photo(600, 500, seed=2)).convert(mode).save(buf, format="JPEG", quality=92)
    source = SourceImage(buf.getvalue())
    view = ViewParams(20, 30, 460, 520, flip=True)
    assert dct_scale(view, FMT.size) == 4
    fast = render_pixels(source, view, FMT).float()
    exact = render_pixels(Image.open(io.BytesIO(buf.getvalue())), view, FMT).float()
    assert fast.shape == (3, 64, 64) and (fast - exact).abs().mean() < 3.0


def test_undecodable_pixels_are_a_counted_skip(tmp_path):
    data = jpeg_bytes(photo(300, 300))
    broken = SourceImage(data[:len(data) // 2])  # the header is there, the scan is cut off
    with pytest.raises(ImageDecodeError) as err:
        broken.at_scale(1)
    assert err.value.skip_reason == "corrupt_image"
    path = tmp_path / "x.jpg"
    path.write_bytes(b"not an image")
    assert open_image(str(path)) == (None, "corrupt_image")


def test_cache_replay_with_reduced_decode_is_bit_identical(tmp_path):
    """Sources 4-9x the teacher's crop: build a cache, replay its views through the CSV loader; the normalised
    replayed pixels equal those the build fed the teacher, bit for bit, and the teacher's embedding matches."""
    data = tmp_path / "data"
    os.makedirs(data / "images")
    rows = ["filepath\ttitle"]
    for i, (w, h) in enumerate([(300, 260), (520, 400), (400, 560), (610, 600)]):
        Image.fromarray(photo(w, h, seed=i)).save(data / "images" / f"{i}.jpg", quality=92)
        rows.append(f"images/{i}.jpg\ta photo number {i}")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(7)
    teacher_model = create_clip("tiny-teacher", None, torch.device("cpu")).eval()
    torch.save(teacher_model.state_dict(), tmp_path / "teacher.pt")
    cache_dir = tmp_path / "cache"
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", str(tmp_path / "teacher.pt"),
                               "--train-data", str(data / "train.csv"), "--data-root", str(data), "--views", "3",
                               "--cache-dtype", "fp32", "--out", str(cache_dir), "--batch-size", "4", "--workers",
                               "0", "--device", "cpu"]) == 0
    teacher = _bundle(teacher_model)
    tfmt = teacher.image_format
    cache = TeacherCache(str(cache_dir), views="all")
    tf = DataTransforms(tokenizer=teacher.tokenizer, train_views=PairedViews(tfmt, None, train=True, seed=0),
                        val_views=PairedViews(tfmt, None, train=False), teacher_cache=cache)
    dataset = CsvDataset([str(data / "train.csv")], [str(data)], tf, is_train=True)
    # --decode-device: the workers ship the replayed view with the bytes, and the trainer renders it
    encoded = CsvDataset([str(data / "train.csv")], [str(data)], DataTransforms(
        tokenizer=teacher.tokenizer, train_views=PairedViews(tfmt, None, train=True, seed=0, encoded=True),
        teacher_cache=cache), is_train=True)
    decoder = BatchDecoder(tfmt, None, torch.device("cpu"))
    scales = set()
    for i in range(len(dataset)):
        source, _ = open_image(dataset.images[i])
        built = cache_build.prepare_sample(source, dataset.captions[i], dataset.keys[i], tfmt, teacher.tokenizer, 3,
                                           seed=0)
        for epoch in range(3):
            sample = dataset[(i, epoch)]
            k = int(sample["teacher_view_index"])
            view = ViewParams.from_tuple(built["views"][k].tolist())
            scales.add(dct_scale(view, tfmt.size))
            assert torch.equal(sample["view"], built["views"][k].long())
            replayed = normalize_pixels(sample["image"], tfmt)
            assert torch.equal(replayed, built["pixels"][k])  # bit-identical to what the teacher embedded
            shipped = encoded[(i, epoch)]
            assert torch.equal(shipped["view"], sample["view"]) and "image" not in shipped
            assert int(shipped["teacher_view_index"]) == k
            pixels = decoder(collate([shipped]))["image"][0]
            assert (pixels.float() - sample["image"].float()).abs().mean() < 2.0  # same view, another resampler
            with torch.no_grad():
                emb = torch.nn.functional.normalize(teacher_model.encode_image(replayed[None]), dim=-1)[0]
            torch.testing.assert_close(emb, sample["teacher_image_emb"].reshape(emb.shape), atol=1e-5, rtol=1e-4)
    assert max(scales) > 1  # the replay went through the reduced decode


def _sources() -> list[SourceImage]:
    """JPEGs from a little above the view to 14x it (every DCT scale of the workers' decode), a grey JPEG, a PNG."""
    sources = [SourceImage(jpeg_bytes(photo(w, h, seed=i)))
               for i, (w, h) in enumerate([(90, 70), (300, 260), (520, 400), (1100, 900), (640, 480)])]
    grey, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo(500, 450, seed=8)).convert("L").save(grey, format="JPEG", quality=92)
    Image.fromarray(photo(200, 150, seed=9)).save(png, format="PNG")
    return sources + [SourceImage(grey.getvalue()), SourceImage(png.getvalue())]


def _inset(view: ViewParams) -> ViewParams:
    """The box shrunk by 1/16 of its size (at least 2 px) on every side: a zoom of a few output pixels."""
    dx, dy = max(2, view.width // 16), max(2, view.height // 16)
    return ViewParams(view.top + dy, view.left + dx, view.height - 2 * dy, view.width - 2 * dx, view.flip)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_trainer_side_decode_draws_the_same_views_and_renders_close_pixels(interpolation):
    student = ImageFormat(64, FMT.mean, FMT.std, interpolation)
    teacher = ImageFormat(96, (0.5,) * 3, (0.25,) * 3, interpolation)
    workers = PairedViews(student, teacher, train=True, scale=(0.35, 1.0), flip_prob=0.5)
    encoded = PairedViews(student, teacher, train=True, scale=(0.35, 1.0), flip_prob=0.5, encoded=True)
    sources = _sources()
    expected = collate([workers(s, rng=sample_rng(0, 0, f"row/{i}")) for i, s in enumerate(sources)])
    shipped = collate([encoded(s, rng=sample_rng(0, 0, f"row/{i}")) for i, s in enumerate(sources)])
    assert set(shipped) == {"encoded", "view", "skipped"} and isinstance(shipped["encoded"], list)
    assert torch.equal(shipped["view"], expected["view"])  # the same draws: seeds, resume and cache replay hold
    assert shipped["view"][:, 4].any() and not shipped["view"][:, 4].all()  # flipped and unflipped views
    decoded = BatchDecoder(student, teacher, torch.device("cpu"))(shipped)
    for name, fmt in (("image", student), ("teacher_image", teacher)):
        out, ref = decoded[name], expected[name]
        assert out.dtype == torch.uint8 and out.shape == ref.shape == (len(sources), 3, fmt.size, fmt.size)
        error = (out.float() - ref.float()).abs().mean((1, 2, 3))
        assert (error < 2.0).all(), error  # another resampling kernel (and a full decode): not bit-identical
        # ... but the same box: another box a few output pixels off is a larger difference
        views = [ViewParams.from_tuple(v) for v in expected["view"].tolist()]
        shifted = torch.stack([render_pixels(s, _inset(v), fmt) for s, v in zip(sources, views)])
        assert (error < (shifted.float() - ref.float()).abs().mean((1, 2, 3))).all()
    assert decoded["skipped"] == {}


def test_trainer_side_decode_blanks_and_counts_an_undecodable_source():
    good, data = SourceImage(jpeg_bytes(photo(300, 260))), jpeg_bytes(photo(300, 300, seed=3))
    broken = SourceImage(data[:len(data) // 2])  # a readable header, a cut-off scan: the workers would skip it
    views = PairedViews(FMT, None, train=True, seed=0, encoded=True)
    batch = collate([views(good), views(broken)])
    out = BatchDecoder(FMT, None, torch.device("cpu"))(batch)
    assert out["skipped"] == {BLANKED: 1} and not out["image"][1].any()
    reference = render_pixels(good, ViewParams.from_tuple(batch["view"][0].tolist()), FMT).float()
    assert (out["image"][0].float() - reference).abs().mean() < 2.0  # the other samples decode as usual


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs a CUDA device")
def test_cuda_decode_renders_the_cpu_decode_pixels():
    """--decode-device cuda (nvjpeg, batched; the PNG falls back to the CPU) renders what the CPU decoder does,
    within a grey level or so, and what the workers render within the tolerance above (scripts/gpu_check.sh)."""
    student, teacher = FMT, ImageFormat(96, (0.5,) * 3, (0.25,) * 3)
    views = PairedViews(student, teacher, train=True, scale=(0.35, 1.0), flip_prob=0.5, encoded=True)
    sources = _sources()
    batch = collate([views(s, rng=sample_rng(0, 0, f"row/{i}")) for i, s in enumerate(sources)])
    on_gpu = BatchDecoder(student, teacher, torch.device("cuda"))(batch)
    on_cpu = BatchDecoder(student, teacher, torch.device("cpu"))(batch)
    workers = collate([PairedViews(student, teacher, train=True, scale=(0.35, 1.0), flip_prob=0.5)(
        s, rng=sample_rng(0, 0, f"row/{i}")) for i, s in enumerate(sources)])
    for name in ("image", "teacher_image"):
        gpu = on_gpu[name]
        assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and gpu.shape == on_cpu[name].shape
        assert (gpu.cpu().float() - on_cpu[name].float()).abs().mean((1, 2, 3)).max() < 1.5
        assert (gpu.cpu().float() - workers[name].float()).abs().mean((1, 2, 3)).max() < 2.0
