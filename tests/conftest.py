import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def data_dir() -> Path:
    return Path(os.environ.get("FIMODA_DATA_DIR", ROOT / "data" / "raw"))


def require_file(rel: str) -> Path:
    """The path of a data file under FIMODA_DATA_DIR, or skip the test with the reason."""
    p = data_dir() / rel
    if not p.exists():
        pytest.skip(f"data file {rel} not found under FIMODA_DATA_DIR={data_dir()}")
    return p


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one intra-op thread: the models here are small, and on a shared
    2-core machine more threads only add OpenMP spinning (measured: a tiny text training took
    51 s on 2 threads, 3.5 s on 1). Tests that check thread-independence set their own."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
