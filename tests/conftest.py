"""Test setup: 4 fake CPU devices, strict rank promotion, and what the tests share: seeded random
draws (`seed`, `key`, `rng`, `seeded_rng`), `rel_err`, `tiny_plan` and the data folders outside
the repository.

Every random draw comes from a seed derived from the test's node id, so a run is reproducible and
each test draws its own numbers. The seed is printed (pytest shows it under "Captured stdout
setup" when the test fails) and recorded as the `seed` property (JUnit XML).
`JAXMAMBA_TEST_SEED=N` shifts every seed, to run the suite on other draws.
"""

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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
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


def seed_for(nodeid: str) -> int:
    """The seed of the test (or module) `nodeid`: stable across runs, machines and `-n`."""
    shift = int(os.environ.get("JAXMAMBA_TEST_SEED", "0"))
    return (sum(ord(c) * (i + 1) for i, c in enumerate(nodeid)) + shift) % 2**31


def seeded_rng(request) -> np.random.Generator:
    """A numpy generator seeded from `request.node` (any fixture scope), its seed printed."""
    seed = seed_for(request.node.nodeid)
    print(f"random seed of {request.node.nodeid}: {seed} (JAXMAMBA_TEST_SEED shifts it)")
    return np.random.default_rng(seed)


@pytest.fixture
def seed(request, record_property) -> int:
    """The test's seed, printed and recorded (a failing test shows it)."""
    value = seed_for(request.node.nodeid)
    print(f"random seed of {request.node.nodeid}: {value} (JAXMAMBA_TEST_SEED shifts it)")
    record_property("seed", value)
    return value


@pytest.fixture
def key(seed):
    """A JAX PRNG key from the test's seed."""
    return jax.random.key(seed)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A numpy generator from the test's seed (a test using `key` too gets the same seed)."""
    return np.random.default_rng(seed)


def rel_err(a, b) -> float:
    """`|a - b| / |b|` in the Frobenius norm, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tiny_plan(**changes):
    """A 2-stage ResEnc plan of a few voxels (patch 8x16x16, features 4/8, one block per stage,
    one MRI channel, labels background/a/b); `changes` are `Plan` fields."""
    from jaxmamba.plans import Plan

    fields = dict(dataset_name="tiny", patch_size=(8, 16, 16), batch_size=2,
                  spacing=(1.0, 1.0, 1.0), normalization_schemes=("ZScoreNormalization",),
                  use_mask_for_norm=(False,), strides=((1, 1, 1), (2, 2, 2)),
                  kernel_sizes=((3, 3, 3), (3, 3, 3)), n_blocks_encoder=(1, 1),
                  n_blocks_decoder=(1,), channel_names=("MRI",),
                  labels=(("background", 0), ("a", 1), ("b", 2)), base_num_features=4,
                  max_num_features=8)
    return Plan(**{**fields, **changes})


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_shared(REFERENCE, "reference")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return require_shared(DATASETS, "datasets")


def hippocampus_raw(datasets_dir: Path, raw: Path, n_cases: int) -> Path:
    """A raw folder `raw` holding the first `n_cases` real cases (symlinks) of
    Dataset004_Hippocampus, its dataset.json's numTraining set to match."""
    import json

    from jaxmamba.data.dataset import RawDataset

    src = datasets_dir / "Dataset004_Hippocampus"
    ids = [c.case_id for c in RawDataset.open(src).cases[:n_cases]]
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for i in ids:
        (raw / "imagesTr" / f"{i}_0000.nii.gz").symlink_to(src / "imagesTr" / f"{i}_0000.nii.gz")
        (raw / "labelsTr" / f"{i}.nii.gz").symlink_to(src / "labelsTr" / f"{i}.nii.gz")
    meta = json.loads((src / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "numTraining": n_cases}))
    return raw


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


# ---------------------------------------------------------------- tiny training runs
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def build_phantom(tmp_path_factory, name: str = "phantom", n_cases: int = 5) -> Path:
    """A folder whose `raw/` holds a phantom dataset of `n_cases` 10x24x24 cases (the runs'
    preprocessing cache goes to its `cache/`)."""
    from jaxmamba.datasets import build

    root = tmp_path_factory.mktemp(name)
    build("phantom", root / "raw", n_cases=n_cases, shape=(10, 24, 24))
    return root


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """`build_phantom`'s folder, shared by the runs of one test module."""
    return build_phantom(tmp_path_factory)


def tiny_run_config(phantom: Path, run_dir: Path, *overrides: str):
    """configs/tiny.yaml on `phantom`'s data, writing to `run_dir`, without progress bars."""
    from jaxmamba.config import load_config

    return load_config(TINY_CONFIG, [f"data.raw_dir={phantom / 'raw'}",
                                     f"data.preprocessed_dir={phantom / 'cache'}",
                                     f"train.run_dir={run_dir}", "log.progress=false",
                                     *overrides])


# ---------------------------------------------------------------- selective-scan inputs
def random_inputs(key, b, l, d, n, *, dtype=jnp.float32, with_optional=True, dt_scale=1.0):
    """Selective-scan inputs by name, channels-last (`u, delta, z: (b, l, d)`, `B, C: (b, l, n)`,
    `A: (d, n)` negative; D, z and delta_bias unless `with_optional=False`)."""
    k = jax.random.split(key, 8)
    out = dict(
        u=jax.random.normal(k[0], (b, l, d), dtype),
        delta=dt_scale * jax.random.normal(k[1], (b, l, d), dtype) - 1.0,
        A=-jnp.exp(jax.random.normal(k[2], (d, n), dtype)),
        B=jax.random.normal(k[3], (b, l, n), dtype),
        C=jax.random.normal(k[4], (b, l, n), dtype),
    )
    if with_optional:
        out.update(D=jax.random.normal(k[5], (d,), dtype),
                   z=jax.random.normal(k[6], (b, l, d), dtype),
                   delta_bias=0.5 * jax.random.normal(k[7], (d,), dtype))
    return out


def random_case(key, b, l, d, n, *, dtype=jnp.float32, **kw):
    """(inputs, an initial state (B, D, N), an output cotangent (B, L, D)); h0 and g float32."""
    kx, kh, kg = jax.random.split(key, 3)
    return (random_inputs(kx, b, l, d, n, dtype=dtype, **kw),
            jax.random.normal(kh, (b, d, n)), jax.random.normal(kg, (b, l, d)))
