"""Test set-up: 8 simulated CPU devices (set before jax is imported) and shared helpers."""

import os

from xla_flags import FAST_COMPILE

# Faster compiles (xla_flags.py says why); train_fixtures.subprocess_env passes them on to the
# command-line runs the tests start.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU ahead-of-time compile tests load libtpu in every pytest-xdist worker;
# without this, libtpu's multi-process lockfile fails all but the first.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent XLA compilation cache for the test run, shared by the in-process tests and the
# command-line subprocesses they start (set here, so they inherit it): many tests compile the same
# tiny programs (the --quick ablation study alone ran 158 s -> 122 s). Under the checkout, so a
# clean clone (CI) starts empty; entries are keyed by the program and jax version, never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 references at 1e-5

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run (-m 'not slow')")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_packing(rng: np.random.Generator, batch: int, length: int, max_segments: int = 5,
                   pad: bool = True):
    """Packed rows: 1..max_segments contiguous segments with random prefixes, padding at the end.

    Returns numpy (segment_ids [B,T] int32, prefix_mask [B,T] bool, positions [B,2,T] int32)
    following the batch contract (docs/design.md): positions restart at 0 in every segment.
    """
    segment_ids = np.zeros((batch, length), np.int32)
    prefix_mask = np.zeros((batch, length), bool)
    positions = np.zeros((batch, 2, length), np.int32)
    for b in range(batch):
        n = int(rng.integers(1, min(max_segments, length) + 1))
        used = int(rng.integers(max(n, length // 2), length + 1)) if pad else length
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(n - 1, used - 1), replace=False))
        bounds = [0, *cuts.tolist(), used]
        for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[b, start:end] = s
            sep = int(rng.integers(0, end - start + 1))
            prefix_mask[b, start:start + sep] = True
            positions[b, 0, start:end] = np.arange(end - start)
            positions[b, 1, start + sep:end] = np.arange(1, end - start - sep + 1)
        positions[b, 0, used:] = np.arange(length - used)
    return segment_ids, prefix_mask, positions
