"""Test setup shared by every test file.

8 host devices so the sharding tests can build meshes on a CPU-only machine. float64 stays off by default,
as for users; tests that need a float64 ground truth (the kernel references) take the `x64` fixture.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield
