import os
import shutil

# No network here: pretrained tags must never try to download in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import write_image_csv  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def image_csv(tmp_path):
    return write_image_csv(str(tmp_path / "data"))


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A folder shared by one module's tests. It is removed when the module is done, unless one of its tests failed:
    kept all session, the checkpoints the suite writes fill a small disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
