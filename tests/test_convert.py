"""python -m gptoss_jax.convert: an orbax checkpoint that loads to the same weights, bit for bit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from cli_errors import assert_one_line_error
from gptoss_jax.checkpoint.converted import convert
from gptoss_jax.errors import ConfigError
from gptoss_jax.runtime import Runtime


def flat_values(model) -> dict:
    return {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_a_converted_checkpoint_loads_to_bit_identical_weights(layout, hub_checkpoint, original_checkpoint, tmp_path):
    source = hub_checkpoint if layout == "hub" else original_checkpoint
    done = subprocess.run([sys.executable, "-m", "gptoss_jax.convert", str(source), str(tmp_path / "orbax")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # bf16 as stored, float32, the experts decoded to bf16, and the TPU's expert layout (interpreted here).
    for options in [dict(dtype="bfloat16"), dict(dtype="float32"), dict(dtype="float32", experts="bfloat16"),
                    dict(dtype="bfloat16", runtime=Runtime("cpu", pallas="tpu", interpret=True))]:  # fmt: skip
        ours, theirs = flat_values(gptoss_jax.load(tmp_path / "orbax", **options)), flat_values(gptoss_jax.load(source, **options))
        assert ours.keys() == theirs.keys()
        for path, value in theirs.items():
            assert ours[path].dtype == value.dtype, path
            np.testing.assert_array_equal(ours[path], value, err_msg=str(path))
    packed = [path for path in theirs if path[-1] in ("blocks", "tpu_blocks")]
    assert packed  # the experts stayed MXFP4


@pytest.mark.quick
def test_converting_into_a_folder_that_is_not_empty_is_refused_and_writes_nothing(hub_checkpoint, tmp_path):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "gptoss_jax.convert", str(hub_checkpoint), str(destination)],
                          capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(done, f"error: {destination}: already exists and is not an empty folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]
    assert [path.name for path in destination.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="not an empty folder"):
        convert(hub_checkpoint, destination)
