"""Shared test setup: the `cuda` marker skips cleanly where no GPU or no CUDA kernels exist, `device` parametrises
a test over CPU and (marked) CUDA, and `rng` gives each test fresh random inputs that a printed seed reproduces."""

import os
import random
import zlib

import pytest
import torch

# Fresh inputs every run; FASTOPTIM_TEST_SEED=<printed seed> replays a failing run exactly.
BASE_SEED = int(os.environ.get("FASTOPTIM_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastoptim random inputs: FASTOPTIM_TEST_SEED={BASE_SEED}"


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    import fastoptim.ops

    return fastoptim.ops.CUDA_KERNELS_BUILT


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    reason = "no CUDA GPU here" if not torch.cuda.is_available() else "fastoptim was built without CUDA kernels"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def rng(request):
    """A CPU generator seeded from the run's seed and the test's id; also seeds torch's global generator."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: on a shared 2-core machine extra threads only contend
    (10–20× slower); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
