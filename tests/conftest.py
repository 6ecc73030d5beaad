"""Test set-up. Without a GPU, Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, at collection time, before `cosattn` loads."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

# import the kernels now, while the variable holds: a module that imports triton later under
# TRITON_INTERPRET=0 (the torch-path fixture) must not be the first to define the @triton.jit functions
import cosattn.ops  # noqa: E402, F401

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """Seeds torch and random from the test's name: fresh inputs per case, reproducible per test id."""
    s = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(s)
    random.seed(s)
    return s


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def torch_attention_path(monkeypatch):
    """Run the op's chunked PyTorch path on CPU (fast) instead of the Triton interpreter (exact but slow):
    for model and trainer tests whose subject is not the kernel. The op reads the variable per call."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


@pytest.fixture
def one_thread():
    """Small shapes gain nothing from intra-op threads, whose spin-waits cost seconds per test on a busy runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide singletons reset before and after a test that builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(params=["triton", "torch"])
def backend_device(request, monkeypatch):
    """The device of one backend, for contract tests that must hold on both: "triton" runs the kernels (natively
    on a GPU, else under the interpreter), "torch" the chunked PyTorch path on CPU. The op reads the variable per
    call."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cuda" if torch.cuda.is_available() else "cpu"
