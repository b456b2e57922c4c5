import os
from pathlib import Path

import torch

# Triton kernels run on CPU through the interpreter when no GPU is present; set before any
# import of triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Under pytest-xdist each worker takes one core: torch's default (a thread per core in every
# worker) oversubscribes the machine and every test slows down.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def _load(name):
    import fastfocal

    return fastfocal.load(DATA / name, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def causal():
    return _load("tiny_causal")


@pytest.fixture(scope="session")
def noncausal():
    return _load("tiny_noncausal")


@pytest.fixture(scope="session")
def golden_causal():
    return dict(np.load(DATA / "tiny_causal" / "golden.npz"))


@pytest.fixture(scope="session")
def golden_noncausal():
    return dict(np.load(DATA / "tiny_noncausal" / "golden.npz"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model steps are op overhead: extra intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
