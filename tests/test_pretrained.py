"""Released checkpoints: the registry, the downloader (against an HTTP server on 127.0.0.1 started here), mirrors,
and a registry name as --teacher-pretrained through the real training CLI."""

import hashlib
import http.server
import os
import re
import socket
import threading
import time

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers the shipped model configs)
from training.errors import UsageError
from training.pretrained import download, load_registry, lookup, resolve
from training.pretrained.__main__ import main as pretrained_main

COLUMNS = "name,arch,url,sha256,role,teacher,data,imagenet_top1,doubtful,note"


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up (the timeout test) breaks the pipe of a late answer: expected here


class FileServer:
    """Serves `files` (path -> bytes) with Range support; per path it can cut the connection after N bytes
    (`cut`, for the next `cut_times` requests), stall before answering (`stall`), or ignore Range (`no_range`)."""

    def __init__(self):
        self.files, self.cut, self.cut_times, self.stall, self.no_range = {}, {}, {}, {}, set()
        self.redirects = {}  # path -> Location (as GitHub redirects release downloads)
        self.requests = []  # (path, Range header or None)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                time.sleep(server.stall.get(self.path, 0))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and self.path not in server.no_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_times.get(self.path, 0) > 0:
                    server.cut_times[self.path] -= 1
                    self.wfile.write(body[:server.cut[self.path]])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, no mirror, and an extra registry file that `rows` writes."""
    monkeypatch.setenv("CLIP_KD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIP_KD_MIRROR", raising=False)
    registry = tmp_path / "extra_registry.csv"

    def rows(*lines):
        registry.write_text("\n".join([COLUMNS, *lines]) + "\n")
        monkeypatch.setenv("CLIP_KD_REGISTRY", str(registry))

    monkeypatch.delenv("CLIP_KD_REGISTRY", raising=False)
    return rows


def _blob(n=300_000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- download ------------------------------------------------------------------------------------------------------
def test_cut_connection_is_resumed_with_range_and_checked(server, env, tmp_path):
    data = _blob()
    server.files["/rel/blob.bin"] = data
    server.cut["/rel/blob.bin"], server.cut_times["/rel/blob.bin"] = 100_000, 1
    env(f"test-blob,tiny-teacher,{server.base}/rel/blob.bin,{_sha(data)},teacher,,synthetic,,,")
    path = download("test-blob", str(tmp_path / "out"), retry_wait=0)
    assert path == str(tmp_path / "out" / "blob.bin")
    assert open(path, "rb").read() == data
    assert _files(tmp_path / "out") == ["blob.bin"]  # no .part, no lock left behind
    assert server.requests == [("/rel/blob.bin", None), ("/rel/blob.bin", "bytes=100000-")]


def test_interrupted_download_keeps_only_a_part_file_and_the_next_call_resumes(server, env, tmp_path, capsys):
    data = _blob(seed=1)
    server.files["/blob.bin"] = data
    server.cut["/blob.bin"], server.cut_times["/blob.bin"] = 123_456, 1
    env(f"test-blob,tiny-teacher,{server.base}/blob.bin,,teacher,,synthetic,,,")
    out = str(tmp_path / "out")
    assert pretrained_main(["download", "test-blob", "--dir", out, "--attempts", "1", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "truncated body" in line and "123456 of 300000" in line and "resumes" in line
    assert _files(out) == ["blob.bin.lock", "blob.bin.part"]  # never a partial under the final name
    assert os.path.getsize(os.path.join(out, "blob.bin.part")) == 123_456
    assert pretrained_main(["download", "test-blob", "--dir", out]) == 0
    assert open(os.path.join(out, "blob.bin"), "rb").read() == data
    assert _files(out) == ["blob.bin"]
    assert server.requests[-1] == ("/blob.bin", "bytes=123456-")


def test_a_complete_part_answered_416_is_finished_and_a_server_ignoring_range_restarts(server, env, tmp_path):
    data = _blob(seed=2)
    server.files["/a.bin"] = server.files["/b.bin"] = data
    server.no_range.add("/b.bin")
    env(f"test-a,tiny-teacher,{server.base}/a.bin,{_sha(data)},teacher,,,,,",
        f"test-b,tiny-teacher,{server.base}/b.bin,{_sha(data)},teacher,,,,,")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin.part").write_bytes(data)  # a previous run got every byte but stopped before the rename
    (out / "b.bin.part").write_bytes(b"\0" * 1000)  # a resume the server will not honour
    assert open(download("test-a", str(out)), "rb").read() == data
    assert open(download("test-b", str(out)), "rb").read() == data
    assert _files(out) == ["a.bin", "b.bin"]
    assert ("/b.bin", "bytes=1000-") in server.requests


def test_redirects_are_followed_and_keep_the_range(server, env, tmp_path):
    data = _blob(seed=6)
    server.files["/objects/blob.bin"] = data
    server.redirects["/releases/blob.bin"] = server.base + "/objects/blob.bin"
    server.cut["/objects/blob.bin"], server.cut_times["/objects/blob.bin"] = 5000, 1
    env(f"test-redirected,tiny-teacher,{server.base}/releases/blob.bin,{_sha(data)},teacher,,,,,")
    assert open(download("test-redirected", str(tmp_path), retry_wait=0), "rb").read() == data
    assert server.requests == [("/releases/blob.bin", None), ("/objects/blob.bin", None),
                               ("/releases/blob.bin", "bytes=5000-"), ("/objects/blob.bin", "bytes=5000-")]


def test_concurrent_callers_share_one_download(server, env, tmp_path):
    data = _blob(seed=7)
    server.files["/shared.bin"] = data
    server.stall["/shared.bin"] = 0.3
    env(f"test-shared,tiny-teacher,{server.base}/shared.bin,{_sha(data)},teacher,,,,,")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(resolve("test-shared"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 3 and len(set(paths)) == 1
    assert open(paths[0], "rb").read() == data
    assert len(server.requests) == 1
    assert _files(tmp_path / "cache") == ["shared.bin"]


def test_404_is_one_line_exit_2_and_leaves_no_file(server, env, tmp_path, capsys):
    env(f"test-missing,tiny-teacher,{server.base}/nothing_here.pt,,teacher,,,,,")
    out = str(tmp_path / "out")
    assert pretrained_main(["download", "test-missing", "--dir", out, "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "404" in line and "nothing_here.pt" in line
    assert [f for f in _files(out) if not f.endswith(".lock")] == []
    assert len(server.requests) == 1  # a 404 is not retried


def test_checksum_mismatch_is_refused_and_the_download_deleted(server, env, tmp_path, capsys):
    data = _blob(seed=3)
    server.files["/ckpt.pt"] = data
    env(f"test-bad,tiny-teacher,{server.base}/ckpt.pt,{_sha(b'something else')},teacher,,,,,")
    out = str(tmp_path / "out")
    assert pretrained_main(["download", "test-bad", "--dir", out, "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "sha256 mismatch" in line and _sha(data) in line
    assert [f for f in _files(out) if not f.endswith(".lock")] == []  # neither the final name nor a .part


def test_timeout_is_one_line_and_leaves_no_file(server, env, tmp_path, capsys):
    server.files["/slow.pt"] = b"x" * 1000
    server.stall["/slow.pt"] = 3.0
    env(f"test-slow,tiny-teacher,{server.base}/slow.pt,,teacher,,,,,")
    out = str(tmp_path / "out")
    start = time.monotonic()
    assert pretrained_main(["download", "test-slow", "--dir", out, "--timeout", "0.5", "--attempts", "1",
                            "--no-progress"]) == 2
    assert time.monotonic() - start < 2.5
    assert "timed out" in _one_error_line(capsys)
    assert not os.path.exists(os.path.join(out, "slow.pt"))


def test_unreachable_server_is_one_line(env, tmp_path, capsys):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env(f"test-down,tiny-teacher,http://127.0.0.1:{port}/x.pt,,teacher,,,,,")
    assert pretrained_main(["download", "test-down", "--dir", str(tmp_path), "--attempts", "1"]) == 2
    assert "cannot connect" in _one_error_line(capsys)


# ---- mirrors and the cache -----------------------------------------------------------------------------------------
def test_mirror_folder_serves_a_shipped_row_by_its_release_file_name(env, tmp_path, monkeypatch):
    env()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = _blob(1000, seed=4)
    (mirror / "ViT-B-16_cc3m_12m_kd_ViT-T-16_cc3m_12m_ep32.pt").write_bytes(data)
    monkeypatch.setenv("CLIP_KD_MIRROR", str(mirror))
    path = resolve("clipkd-vit-t-16-kd-vit-b-16-cc3m12m")
    assert path == str(mirror / "ViT-B-16_cc3m_12m_kd_ViT-T-16_cc3m_12m_ep32.pt")  # used in place
    copied = download("clipkd-vit-t-16-kd-vit-b-16-cc3m12m", str(tmp_path / "out"))
    assert open(copied, "rb").read() == data
    with pytest.raises(UsageError, match="not found"):
        resolve("clipkd-vit-t-16-cc3m12m")  # not in the mirror: an error, not a silent download


def test_http_mirror_replaces_the_release_base_and_the_cache_is_used_once(server, env, tmp_path, monkeypatch):
    env()
    data = _blob(5000, seed=5)
    server.files["/internal/releases/RN50_cc3m_12m_ep32.pt"] = data
    monkeypatch.setenv("CLIP_KD_MIRROR", server.base + "/internal/releases/")
    path = resolve("clipkd-resnet-50-cc3m12m")
    assert path == str(tmp_path / "cache" / "RN50_cc3m_12m_ep32.pt")
    assert open(path, "rb").read() == data
    assert resolve("clipkd-resnet-50-cc3m12m") == path
    assert len(server.requests) == 1


def test_cache_dir_follows_clip_kd_cache_then_xdg(monkeypatch, tmp_path):
    from training.pretrained import cache_dir

    monkeypatch.setenv("CLIP_KD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("CLIP_KD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "clip-kd")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "clip-kd")


# ---- resolve -------------------------------------------------------------------------------------------------------
def test_resolve_leaves_tags_paths_and_empty_values_alone(env, tmp_path):
    env()
    local = tmp_path / "clipkd-my-run.pt"
    local.write_bytes(b"")
    for value in ("openai", "laion400m_e32", "", None, str(local), "/no/such/file.pt"):
        assert resolve(value) == value


def test_resolve_refuses_typos_doubtful_rows_and_other_architectures(env):
    env()
    with pytest.raises(UsageError, match="did you mean clipkd-vit-t-16-kd-vit-b-16-cc3m12m"):
        resolve("clipkd-vit-t-16-kd-vit-b16-cc3m12m")
    with pytest.raises(UsageError, match="no download link"):
        resolve("clipkd-efficientnet-b0-kd-resnet-101-cc3m12m")
    with pytest.raises(UsageError, match="doubtful.*EfficientNet-B0 file"):
        resolve("clipkd-resnet-18-kd-resnet-101-cc3m12m")
    with pytest.raises(UsageError, match="doubtful.*_cc3m_12.pt"):
        resolve("clipkd-mobilenetv3-kd-resnet-101-cc3m12m")
    with pytest.raises(UsageError, match="is a ViT-B-16 checkpoint, not a ViT-T-16 one"):
        resolve("clipkd-vit-b-16-cc3m12m", "ViT-T-16")


def test_extra_registry_may_not_shadow_open_clip_tags_or_shipped_names(env):
    env("openai,ViT-B-16,http://127.0.0.1/x.pt,,teacher,,,,,")
    with pytest.raises(UsageError, match="shadow the open_clip pretrained tag"):
        load_registry()
    env("clipkd-vit-b-16-cc3m12m,ViT-B-16,http://127.0.0.1/x.pt,,teacher,,,,,")
    with pytest.raises(UsageError, match="already defined"):
        load_registry()


# ---- the shipped registry ------------------------------------------------------------------------------------------
# independent reference: numbers and file names copied from the CLIP-KD README's tables
README_ROWS = {
    "clipkd-vit-t-16-kd-vit-b-16-cc3m12m": ("34.90", "ViT-B-16_cc3m_12m_kd_ViT-T-16_cc3m_12m_ep32.pt"),
    "clipkd-vit-l-14-laion400m": ("72.8", "ViT_L_14-laion400m_ep32.pt"),
    "clipkd-vit-b-16-cc3m12m": ("36.99", "ViT_B_16_cc3m_12m_ep32.pt"),
    "clipkd-resnet-101-cc3m12m": ("36.76", "RN101_cc3m_12m_ep32.pt"),
    "clipkd-swin-t-kd-resnet-101-cc3m12m": ("39.51",
                                            "RN101_cc3m_12m_kd_timm-swin_tiny_patch4_windows7_224_cc3m_12m_ep32.pt"),
    "clipkd-resnet-50-kd-vit-b-16-laion400m": ("55.4", "ViT-B-16_laion400m_kd_RN50_cc3m_12m_ep32.pt"),
    "clipkd-vit-t-16-kd-vit-b-16-laion400m": ("42.6", "ViT_B_16_laion400m_kd_ViT_T_16_cc3m_12m_ep32.pt"),
    "clipkd-mobilenetv3-kd-resnet-101-cc3m12m": ("26.15", "RN101_cc3m_12m_kd_timm_mobilenetv3_small_100_cc3m_12.pt"),
}


def test_list_prints_every_shipped_row_with_its_published_number(env, capsys):
    env()
    assert pretrained_main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = load_registry()
    assert len(rows) == 26 == len(lines) - 1  # 25 distinct links in the README + the row without one
    by_name = {line.split()[0]: line for line in lines[1:]}
    for name, ckpt in rows.items():
        assert re.search(rf"\s{re.escape(ckpt.imagenet_top1)}\s", by_name[name] + " "), by_name[name]
    for name, (top1, file_name) in README_ROWS.items():
        assert lookup(name).imagenet_top1 == top1 and f" {top1} " in by_name[name] + " "
        assert lookup(name).url == "https://github.com/winycg/CLIP-KD/releases/download/CLIP-KDv0.1/" + file_name
    doubtful = {n for n, line in by_name.items() if "DOUBTFUL" in line}
    assert doubtful == {"clipkd-efficientnet-b0-kd-resnet-101-cc3m12m", "clipkd-resnet-18-kd-resnet-101-cc3m12m",
                        "clipkd-mobilenetv3-kd-resnet-101-cc3m12m"}
    assert lookup("clipkd-efficientnet-b0-kd-resnet-101-cc3m12m").url == ""


def test_shipped_rows_name_known_architectures_and_teachers_and_unique_urls(env):
    env()
    rows = load_registry()
    known = set(open_clip.list_models())
    tags = {tag for _, tag in open_clip.list_pretrained()}
    for ckpt in rows.values():
        assert ckpt.arch in known, ckpt
        assert ckpt.name not in tags
        assert (ckpt.role == "student") == bool(ckpt.teacher), ckpt
        if ckpt.teacher:
            assert rows[ckpt.teacher].role == "teacher"
    urls = [c.url for c in rows.values() if c.url]
    assert len(urls) == len(set(urls)) == 25


def test_registry_csv_is_package_data():
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["training"]
    assert "pretrained/*.csv" in package_data
    assert os.path.isfile(os.path.join(root, "src", "training", "pretrained", "registry.csv"))


# ---- through the training CLI --------------------------------------------------------------------------------------
def test_teacher_pretrained_registry_name_trains_from_a_mirror_folder(env, tmp_path, monkeypatch):
    from helpers import write_image_csv
    from training import trainer as trainer_module
    from training.main import main
    from training.models import create_clip, read_state_dict

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.manual_seed(11)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), mirror / "tiny_teacher_ep1.pt")
    served = read_state_dict(str(mirror / "tiny_teacher_ep1.pt"))
    with socket.socket() as s:  # the registry's own URL is dead: only the mirror can serve the file
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env(f"cluster-tiny-teacher,tiny-teacher,http://127.0.0.1:{port}/tiny_teacher_ep1.pt,"
        f"{hashlib.sha256((mirror / 'tiny_teacher_ep1.pt').read_bytes()).hexdigest()},teacher,,synthetic,,,")
    monkeypatch.setenv("CLIP_KD_MIRROR", str(mirror))

    built = []
    real_create_teacher = trainer_module.create_teacher

    def spy(*args, **kwargs):
        built.append(real_create_teacher(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer_module, "create_teacher", spy)
    csv = write_image_csv(str(tmp_path / "data"), n=16, size=64)
    argv = ["--model", "tiny-student", "--teacher", "tiny-teacher", "--teacher-pretrained", "cluster-tiny-teacher",
            "--train-data", csv, "--data-root", str(tmp_path / "data"), "--batch-size", "8", "--epochs", "1",
            "--max-steps", "2", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--workers", "0",
            "--logs", str(tmp_path / "logs"), "--name", "from-registry", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", "--recipe", "clip-kd"]
    assert main(argv) == 0
    (teacher, _), = built
    got = teacher.members[0].state_dict()
    assert got.keys() == served.keys()
    for k in served:
        assert torch.equal(got[k], served[k]), k
    assert os.path.isfile(tmp_path / "logs" / "from-registry" / "checkpoints" / "epoch_1.pt")


def test_export_takes_a_registry_name_as_its_checkpoint(env, tmp_path, monkeypatch):
    from training.export import main as export_main
    from training.models import create_clip, read_state_dict

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.manual_seed(12)
    torch.save({"epoch": 32, "state_dict": create_clip("tiny-student", None, torch.device("cpu")).state_dict()},
               mirror / "tiny_student_ep32.pt")  # the open_clip training-checkpoint layout of the releases
    env("cluster-tiny-student,tiny-student,https://releases.invalid/tiny_student_ep32.pt,,student,"
        "cluster-tiny-teacher,synthetic,,,")
    monkeypatch.setenv("CLIP_KD_MIRROR", str(mirror))
    out = str(tmp_path / "student.safetensors")
    assert export_main(["cluster-tiny-student", out, "--model", "tiny-student"]) == 0
    exported, served = read_state_dict(out), read_state_dict(str(mirror / "tiny_student_ep32.pt"))
    assert exported.keys() == served.keys() and all(torch.equal(exported[k], served[k]) for k in served)
    # a release records no flags: the registry names the architecture, for both export forms
    assert export_main(["cluster-tiny-student", str(tmp_path / "bare.pt")]) == 0
    assert all(torch.equal(read_state_dict(str(tmp_path / "bare.pt"))[k], served[k]) for k in served)
    assert export_main(["cluster-tiny-student", str(tmp_path / "hf"), "--hf"]) == 0
    assert (tmp_path / "hf" / "open_clip_model.safetensors").is_file()


def test_a_file_url_in_an_extra_registry_is_used_in_place(env, tmp_path):
    blob = tmp_path / "internal" / "weights.pt"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    other = tmp_path / "internal" / "other.pt"
    other.write_bytes(b"weights")
    env(f"lab-file,tiny-teacher,file://{blob},{_sha(b'weights')},teacher,,,,,",
        f"lab-path,tiny-teacher,{other},{_sha(b'other')},teacher,,,,,")
    assert resolve("lab-file") == str(blob)
    with pytest.raises(UsageError, match="sha256 mismatch"):
        resolve("lab-path")
    assert other.read_bytes() == b"weights"  # a mirror's or a registry's own file is never deleted


def test_teacher_pretrained_name_without_teacher_is_refused_not_inferred(env, capsys):
    from training.main import main

    env()
    assert main(["--teacher-pretrained", "clipkd-vit-b-16-cc3m12m", "--train-data", "unused.csv"]) == 2
    assert "--teacher-pretrained needs --teacher" in _one_error_line(capsys)
