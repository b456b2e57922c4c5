import os

import torch

# Without a GPU the kernels run in Triton's interpreter; it must be chosen before triton is
# imported (triton.jit decides at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def causal(data_dir):
    """The tiny checkpoints where the kernels run: CUDA on a GPU machine, else CPU (interpreted)."""
    import fastfocal

    return fastfocal.load(data_dir / "tiny_causal", device=DEVICE, dtype=torch.float32)


@pytest.fixture(scope="session")
def noncausal(data_dir):
    import fastfocal

    return fastfocal.load(data_dir / "tiny_noncausal", device=DEVICE, dtype=torch.float32)


@pytest.fixture
def triton_backend(monkeypatch):
    """fastfocal.ops dispatches to the Triton kernels for the duration of a test."""
    monkeypatch.setenv("FASTFOCAL_BACKEND", "triton")


@pytest.fixture(autouse=True)
def one_thread():
    """The interpreter's numpy and torch's OpenMP pools fight over the cores (a tiny matmul
    then takes ~10 ms): one torch thread while interpreting."""
    n = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
