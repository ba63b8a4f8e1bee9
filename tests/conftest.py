"""Shared fixtures: small random checkpoints written in both released layouts from the same weights."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The test extra installs the TPU and GPU compilers (gptoss_jax[plan]) to plan for them; on a host with
# neither, jax must not try to start them (the CUDA plugin would fail its driver check and print a
# traceback in every process). On a GPU or TPU host, run the suite with JAX_PLATFORMS=cuda or tpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, shared by the workers and every subprocess they
# start (they inherit the variable): the same small programs are compiled by many tests, each with its own
# jit objects, and most of the suite's time is XLA's compiler. A cache the caller names is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="gptoss_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the small programs add up too
    atexit.register(shutil.rmtree, _RUN_CACHE, ignore_errors=True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest

from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.writer import write_hub_checkpoint, write_original_checkpoint
from gptoss_jax.config import GptOssConfig
from harmony_vocab import harmony_vocab_dir  # noqa: F401 (a fixture: the o200k vocabulary offline)

TINY = GptOssConfig.preset("tiny")
# The tiny model with the full o200k_harmony vocabulary, for chat through openai-harmony.
TINY_HARMONY = TINY.replace(vocab_size=201088)


def decode_case(rng, sliding: bool):
    """A decode step's case for the attention kernels (TPU and CPU): a stacked cache of 2 groups read at
    group 1, 3 rows: one part-filled (with stale slots past its query from an earlier, longer sequence),
    one padding row (query at -1), one far along. Returns the config, q, keys and values (float32),
    positions, the query positions and sinks."""
    groups, batch, features = 2, 3, TINY.num_kv_heads * TINY.head_dim
    slots = TINY.sliding_window if sliding else 45
    at = np.array([20, -1, 40 if sliding else 44], np.int32)
    positions = np.full((groups, batch, slots), -1, np.int32)
    for row, last in enumerate(at):
        filled = np.arange(max(last, 9) + 1)  # the padding row holds slots 0..9 of someone else's
        if row == 0 and not sliding:
            filled = np.arange(slots)  # stale slots past 20 from an earlier sequence
        positions[:, row, filled % slots] = filled
    keys, values = (rng.standard_normal((groups, batch, slots, features)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((batch, TINY.num_kv_heads, TINY.num_heads // TINY.num_kv_heads, TINY.head_dim))
    sinks = rng.standard_normal((TINY.num_kv_heads, TINY.num_heads // TINY.num_kv_heads))
    return TINY, jnp.asarray(q, jnp.float32), keys, values, positions, at, jnp.asarray(sinks, jnp.float32)


@pytest.fixture(scope="session")
def tiny_config() -> GptOssConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_tensors() -> dict[str, np.ndarray]:
    return random_hub_tensors(TINY, seed=0)


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory, tiny_tensors):
    """Hub layout with an index and two shards."""
    return write_hub_checkpoint(tmp_path_factory.mktemp("ckpt") / "hub", TINY, tiny_tensors)


@pytest.fixture(scope="session")
def hub_single_file_checkpoint(tmp_path_factory, tiny_tensors):
    """Hub layout as one model.safetensors with no index."""
    return write_hub_checkpoint(tmp_path_factory.mktemp("ckpt") / "hub1", TINY, tiny_tensors, single_file=True)


@pytest.fixture(scope="session")
def original_checkpoint(tmp_path_factory, tiny_tensors):
    """OpenAI's original layout, the same weights."""
    return write_original_checkpoint(tmp_path_factory.mktemp("ckpt") / "original", TINY, tiny_tensors)


@pytest.fixture(scope="session")
def harmony_checkpoint(tmp_path_factory):
    """A tiny random model whose vocabulary is harmony's (201088 tokens)."""
    return write_hub_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "harmony", TINY_HARMONY, random_hub_tensors(TINY_HARMONY, seed=2)
    )


@pytest.fixture(scope="session")
def long_tokens() -> np.ndarray:
    """Two sequences of 72 tokens: four and a half sliding windows of the tiny model."""
    return np.random.default_rng(1).integers(0, TINY.vocab_size, size=(2, 72)).astype(np.int32)


# The longest files, run first: the workers take files in collection order, so a long file collected
# last would leave one worker running it alone at the end (the 8-device training runs: ~9 minutes).
LONGEST_FIRST = ("test_sharded_training.py", "test_grpo.py", "test_notebooks.py", "test_sft.py", "test_sharding.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (a stable sort: within a file, the written order); then skip, saying why,
    the tests this host cannot run: on a GPU or TPU host the CPU kernels' tests, and wherever the kernels
    are turned off (GPTOSS_JAX_KERNELS=0, the suite's run without them). Never on a CPU host whose kernel
    build failed: that must fail the suite."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
    if not any(item.get_closest_marker("cpu_kernels") for item in items):
        return
    from gptoss_jax.runtime import Runtime

    runtime = Runtime.default()
    if runtime.cpu_kernels is not None:
        return
    if runtime.platform == "cpu" and os.environ.get("GPTOSS_JAX_KERNELS", "1") != "0":
        return  # a build that failed on a CPU host fails the kernels' tests (with its reason), never skips them
    if runtime.platform != "cpu":
        reason = f"needs the CPU kernels; jax's platform here is {runtime.platform}"
    else:
        from gptoss_jax.backends import cpu

        reason = f"needs the CPU kernels: {cpu.load_kernels().reason}"
    for item in items:
        if item.get_closest_marker("cpu_kernels"):
            item.add_marker(pytest.mark.skip(reason=reason))
