import os

import torch

# Autotuning compiles every config for each new (head dim, masks) key, which the many GPU test cases would
# pay again and again: tests use the first config of each list; the benchmarks tune.
os.environ.setdefault("ACCEL_PATCH_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    # GPU tests run on the device machine; without CUDA they are deselected (never reported as passed).
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if "gpu" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "gpu" not in item.keywords]
