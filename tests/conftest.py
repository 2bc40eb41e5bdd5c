import os

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
