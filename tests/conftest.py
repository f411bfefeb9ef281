import gc
import os

import pytest
import torch

# Autotuning compiles every config for each new (head dim, masks) key, which the many GPU test cases would
# pay again and again: tests use the first config of each list; the benchmarks tune.
os.environ.setdefault("ACCEL_PATCH_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    # GPU tests run on the device machine; without the GPUs a test needs it is deselected (never reported as passed)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needs = {"gpu": 1, "two_gpus": 2}
    deselected = [item for item in items if any(mark in item.keywords and gpus < n for mark, n in needs.items())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """Parallel test workers share one GPU: after each GPU test its worker hands back the blocks its caching allocator
    kept, so that a finished large test's cache does not count against large tests in other workers. It cannot help
    when several large tests run at once: at ``-n 4`` the suite still ran out of memory in some runs (``-n 2`` did
    not)."""
    yield
    if "gpu" in request.keywords:
        gc.collect()
        torch.cuda.empty_cache()
