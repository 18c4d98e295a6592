"""Shared test setup: the Triton interpreter when there is no GPU, the `gpu` marker, a seed.

This module is imported before any test module, so the environment variables it sets are in
place before anything imports triton (@triton.jit reads TRITON_INTERPRET when it decorates a
kernel, that is, when `minipt.kernels` is imported).
"""

import os
import random

import torch  # importing torch does not import triton, and cuda.is_available() does not either

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # No GPU: run the Triton kernels on the CPU interpreter (numpy underneath, about 1 ms per
    # program instance, so the tests keep grids small). Kept if the caller already set it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernels contain no float multiply-add, so FMA contraction cannot change a result; saying
# so explicitly silences Triton 3.9's warning about the changing default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N already runs N processes; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """Seed Python and torch (CPU and CUDA) so a test's random tensors are the same every run."""
    random.seed(0)
    torch.manual_seed(0)  # also seeds every CUDA device
    return 0
