"""Test setup: 4 fake CPU devices, strict rank promotion, a PRNG key fixture, shared fixtures."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

#: Reference material from the PyTorch implementation; CI has `shared/` beside the checkout.
SHARED = Path(os.environ.get("JAXMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
DATASETS = SHARED / "datasets"


@pytest.fixture
def key(request):
    """A fresh PRNG key per test, derived from the test's name (stable across runs)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return jax.random.key(seed)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE}; set JAXMAMBA_SHARED")
    return REFERENCE


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"shared datasets not found at {DATASETS}; set JAXMAMBA_SHARED")
    return DATASETS


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (JAX backend: {jax.default_backend()})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
