"""Fixtures shared by the GPU tests: the device under test (CUDA, or BEVFUSION_GPU_TEST_DEVICE for a dry
run) and fp32 without TF32 for every comparison."""
import pytest

import gpu_case as gc


@pytest.fixture(scope="module")
def device():
    return gc.device_under_test()


@pytest.fixture(autouse=True)
def _full_precision():
    with gc.no_tf32():
        yield
