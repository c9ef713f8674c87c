"""CUDA-only tests: every test here is marked `gpu` and skipped without a CUDA device."""

import os

import pytest

# cuBLAS is deterministic only with a fixed workspace, and reads this when CUDA starts: set
# here, before any test touches the GPU (test_core_gpu's resume under
# torch.use_deterministic_algorithms). It costs the other tests nothing measurable.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
