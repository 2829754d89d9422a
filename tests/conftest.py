"""Shared test setup: the `cuda` marker skips cleanly where no GPU or no CUDA kernels exist, `device` parametrises
a test over CPU and (marked) CUDA, and `rng` gives each test fresh random inputs that a printed seed reproduces.

Seeds: every run draws a fresh FASTOPTIM_TEST_SEED (printed in the header; set it to replay a run). With
FASTOPTIM_TEST_SEEDS=N every test that takes `rng` runs N times, on the N consecutive seeds from the base seed, each
shown in its id as `seed<S>`: `FASTOPTIM_TEST_SEED=S` alone then replays that one case. The sweep that every
randomised test must pass: `FASTOPTIM_TEST_SEED=1 FASTOPTIM_TEST_SEEDS=50 pytest tests`.
"""

import os
import random
import re
import zlib

import pytest
import torch

BASE_SEED = int(os.environ.get("FASTOPTIM_TEST_SEED", random.randrange(2**31)))
SEEDS = [BASE_SEED + k for k in range(int(os.environ.get("FASTOPTIM_TEST_SEEDS", "1")))]


def pytest_report_header(config):
    sweep = f" (and the next {len(SEEDS) - 1}: FASTOPTIM_TEST_SEEDS={len(SEEDS)})" if len(SEEDS) > 1 else ""
    return f"fastoptim random inputs: FASTOPTIM_TEST_SEED={BASE_SEED}{sweep}"


def pytest_generate_tests(metafunc):
    if len(SEEDS) > 1 and "test_seed" in metafunc.fixturenames:
        metafunc.parametrize("test_seed", SEEDS, ids=[f"seed{s}" for s in SEEDS], indirect=True)


@pytest.fixture
def test_seed(request):
    """The base seed of this test's inputs: the run's, or in a sweep the one in the test's id."""
    return getattr(request, "param", BASE_SEED)


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
def rng(request, test_seed):
    """A CPU generator seeded from the test's base seed and its id (without the sweep's seed); also seeds torch's
    global generator."""
    test_id = re.sub(r"(?<=[\[-])seed\d+-|-seed\d+(?=\])|\[seed\d+\]", "", request.node.nodeid)
    seed = (test_seed + zlib.crc32(test_id.encode())) % (2**31)
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
