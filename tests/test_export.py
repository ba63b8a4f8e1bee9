"""train.export: merged checkpoints load in gptoss_jax and in transformers alike; untouched tensors keep their bytes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import gptoss_jax
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.reader import open_checkpoint
from gptoss_jax.checkpoint.writer import write_original_checkpoint
from gptoss_jax.lora import TARGETS, LoRAConfig
from gptoss_jax.training import OptimizerConfig
from test_model_parity import relative_error, transformers_logits
from test_sft import make_config
from train import export, sft

pytestmark = pytest.mark.peer  # compares with transformers / OpenAI's reference (torch on the CPU)

TOKENS = np.random.default_rng(5).integers(0, 201088, size=(2, 40)).astype(np.int32)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, harmony_checkpoint, harmony_vocab_dir) -> Path:
    """A few LoRA steps on every target, so every adapted weight changes."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    config = make_config(run_dir, harmony_checkpoint, steps=3, lora=LoRAConfig(rank=4, alpha=8.0, targets=TARGETS))
    sft.train(config, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, harmony_checkpoint, harmony_vocab_dir) -> Path:
    """Adapters saved untouched (learning rate 0): b stays zero."""
    run_dir = tmp_path_factory.mktemp("export") / "untrained"
    config = make_config(
        run_dir, harmony_checkpoint, steps=1, lora=LoRAConfig(rank=4, targets=TARGETS),
        optimizer=OptimizerConfig(learning_rate=0.0),
    )  # fmt: skip
    sft.train(config, progress=False)
    return run_dir


def hub_tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_exported_mxfp4_checkpoint_matches_transformers_and_keeps_the_training(
    tmp_path, harmony_checkpoint, trained_run
):
    out = export.export(harmony_checkpoint, trained_run, tmp_path / "out")
    ours = np.asarray(gptoss_jax.load(out, dtype="float32")(TOKENS))
    assert relative_error(ours, transformers_logits(out, TOKENS, torch.float32)) <= 1e-4
    base = np.asarray(gptoss_jax.load(harmony_checkpoint, dtype="float32")(TOKENS))
    assert relative_error(ours, base) > 1e-2  # the fine-tuning is in the exported weights
    # The base's files, config and vocabulary come along.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(harmony_checkpoint).iterdir())
    assert json.loads((out / "config.json").read_text()) == json.loads((harmony_checkpoint / "config.json").read_text())


def test_exported_bfloat16_experts_match_transformers_and_the_adapted_model(
    tmp_path, harmony_checkpoint, trained_run
):
    out = export.export(harmony_checkpoint, trained_run, tmp_path / "out", experts="bfloat16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # Loaded with the default arguments (but the dtype): the bf16 experts stay bf16, nothing is re-quantized.
    model = gptoss_jax.load(out, dtype="float32")
    assert model.experts == "bfloat16"
    ours = np.asarray(model(TOKENS))
    assert relative_error(ours, transformers_logits(out, TOKENS, torch.float32)) <= 1e-4
    # Quantizing is still there when asked for, and it is lossy.
    requantized = np.asarray(gptoss_jax.load(out, dtype="float32", experts="mxfp4")(TOKENS))
    assert relative_error(requantized, ours) > 1e-3
    expected = np.asarray(export.load_trained(harmony_checkpoint, trained_run, dtype="float32")(TOKENS))
    base = np.asarray(gptoss_jax.load(harmony_checkpoint, dtype="float32")(TOKENS))
    # Merged weights rounded to bf16 stay far closer to the adapted model than the base is.
    assert np.abs(ours - expected).mean() < 0.05 * np.abs(base - expected).mean()


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_unmodified_adapters_export_the_base_tensors_byte_for_byte(tmp_path, harmony_checkpoint, untrained_run, layout):
    base = Path(harmony_checkpoint)
    if layout == "original":
        source = open_checkpoint(base)
        tensors = {name: source.read(name) for names in source.shards().values() for name in names}
        base = write_original_checkpoint(tmp_path / "original", source.config, tensors)
    out = export.export(base, untrained_run, tmp_path / "out")
    exported, expected = hub_tensors(out), hub_tensors(Path(harmony_checkpoint))
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes(), name


def test_export_errors_are_one_line_and_leave_nothing(tmp_path, harmony_checkpoint, trained_run, capsys):
    out = tmp_path / "out"
    assert export.main(["--base", str(harmony_checkpoint), "--adapters", str(tmp_path), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'config.yaml'}: missing (not a training run directory?)\n"
    # A run of another model (half the layers): its adapters do not fit this base.
    other = tmp_path / "other"
    config = gptoss_jax.GptOssConfig.preset("tiny").replace(num_layers=2)
    other_base = gptoss_jax.checkpoint.writer.write_hub_checkpoint(other, config, random_hub_tensors(config))
    assert export.main(["--base", str(other_base), "--adapters", str(trained_run), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {trained_run / 'checkpoints'}: checkpoint 3 does not fit this model")
    assert error.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["other"]


def test_a_full_fine_tuning_run_exports_every_trained_weight(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    config = make_config(
        tmp_path / "full", harmony_checkpoint, steps=2, lora=None,  # experts auto: decoded to bf16 to train
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )  # fmt: skip
    trained = sft.train(config, progress=False).model()
    out = export.export(harmony_checkpoint, tmp_path / "full", tmp_path / "out", experts="bfloat16")
    loaded = gptoss_jax.load(out, dtype="float32", experts="bfloat16")
    base = gptoss_jax.load(harmony_checkpoint, dtype="float32", experts="bfloat16")
    # Every exported weight is the trained one rounded to bf16 (the hub layout's dtype), bit for bit.
    leaves = [jax.tree.leaves(nnx.state(model, nnx.Param)) for model in (trained, loaded, base)]
    changed = 0
    for trained_value, exported_value, base_value in zip(*leaves):
        rounded = np.asarray(trained_value, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(exported_value, np.float32), rounded)
        changed += not np.array_equal(rounded, np.asarray(base_value, np.float32))
    assert changed > len(leaves[0]) // 2  # most weights moved by more than bf16's rounding in two steps
