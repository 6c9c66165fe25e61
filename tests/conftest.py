"""Test setup: 4 fake CPU devices, strict rank promotion, a PRNG key fixture, shared fixtures."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

#: JAX's persistent compilation cache stays off in tests (and in the commands they start): no
#: test writes to the user's cache directory (tests/test_compile_cache.py turns it on in a tmp dir).
os.environ["JAXMAMBA_COMPILE_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

#: Data that is not in the repository: `shared/` beside the checkout (CI provides it there) or
#: the folder named by JAXMAMBA_SHARED. Tests that need it skip without it, and fail in CI.
SHARED = Path(os.environ.get("JAXMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
DATASETS = SHARED / "datasets"
MISSING = {
    "reference": "the reference fixtures (outputs, parameter counts and plans of the PyTorch "
                 "reference: TamingMambas, mamba_ssm, dynamic-network-architectures)",
    "datasets": "the MSD Hippocampus dataset in nnU-Net layout (datasets/"
                "Dataset004_Hippocampus: Task04_Hippocampus of the Medical Segmentation "
                "Decathlon, medicaldecathlon.com, converted with `nnUNetv2_convert_MSD_dataset "
                "-i Task04_Hippocampus`)",
}


def require_shared(path: Path, what: str) -> Path:
    """`path` if it is a folder; else skip the test, saying what is missing and how to get it
    (fail instead where CI=true: CI must have it)."""
    if path.is_dir():
        return path
    message = (f"{path} not found: {MISSING[what]}. It is not in the repository: put the "
               f"project's shared/ folder beside the checkout, or set JAXMAMBA_SHARED to a "
               f"folder holding {what}/")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message} (CI=true: CI must provide it)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def key(request):
    """A fresh PRNG key per test, derived from the test's name (stable across runs)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return jax.random.key(seed)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_shared(REFERENCE, "reference")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return require_shared(DATASETS, "datasets")


#: The test extra installs torch and nnunetv2 on Python < 3.12 only (pyproject.toml): there the
#: `nnunet` tests run (and fail without them); on newer Pythons they skip.
NNUNET_TOOLCHAIN = sys.version_info < (3, 12)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX's default backend is a GPU; tests marked `nnunet`
    only on the Python 3.11 toolchain."""
    skips = {}
    if jax.default_backend() != "gpu":
        skips["gpu"] = pytest.mark.skip(
            reason=f"needs a GPU (JAX backend: {jax.default_backend()})")
    if not NNUNET_TOOLCHAIN:
        skips["nnunet"] = pytest.mark.skip(
            reason=f"nnU-Net oracle (torch 2.13 CPU, nnunetv2 2.8): the test extra installs them "
                   f"on Python 3.11 only; these tests run on the Python 3.11 toolchain (.ci/run), "
                   f"this is Python {sys.version_info.major}.{sys.version_info.minor}")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
