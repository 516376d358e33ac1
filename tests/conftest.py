"""Shared fixtures and hypothesis profiles (`--hypothesis-profile=dev|ci`)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# One thread per process: pytest-xdist runs two workers on two cores, and more
# threads than cores makes OpenMP spin-wait (tenfold slowdowns seen here).
torch.set_num_threads(1)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
#: The devices a test runs on: the CPU, and CUDA when there is one (skipped,
#: with that reason, otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)
