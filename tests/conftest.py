import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests run on the device machine; without CUDA they are deselected (never reported as passed).
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if "gpu" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "gpu" not in item.keywords]
