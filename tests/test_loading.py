"""Loading: layout detection, hub repo ids through a local cache, packed residency, memory, and bad input."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import gptoss_jax
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.writer import write_hub_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import CheckpointError, ConfigError, GptOssError
from gptoss_jax.nn.moe import PackedBytes

# Experts dominate the bytes, as in the released models (there, 12 of 12.8 GiB).
EXPERT_HEAVY = GptOssConfig.preset("tiny").replace(hidden_size=256, intermediate_size=256, num_experts=16)


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.mark.quick
def test_hub_download_of_the_original_subfolder_is_found(tmp_path, original_checkpoint, long_tokens):
    # A hub download holds the original layout in original/; the folder's root has only other files.
    shutil.copytree(original_checkpoint, tmp_path / "original")
    (tmp_path / "README.md").write_text("a model card\n")
    direct = gptoss_jax.load(original_checkpoint, dtype="float32")
    parent = gptoss_jax.load(tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.asarray(parent(long_tokens)), np.asarray(direct(long_tokens)))


def test_repo_id_resolves_through_a_prefilled_hub_cache_offline(tmp_path, hub_checkpoint, long_tokens):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openai--gpt-oss-20b"
    shutil.copytree(hub_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    np.save(tmp_path / "tokens.npy", long_tokens)
    result = run_python(
        f"""
        import numpy as np, gptoss_jax
        model = gptoss_jax.load("openai/gpt-oss-20b", dtype="float32")
        np.save({str(tmp_path / "logits.npy")!r}, np.asarray(model(np.load({str(tmp_path / "tokens.npy")!r}))))
        """,
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    expected = gptoss_jax.load(hub_checkpoint, dtype="float32")(long_tokens)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), np.asarray(expected))


@pytest.mark.quick
def test_repo_id_missing_from_an_offline_cache_is_a_clear_error(tmp_path):
    result = run_python(
        """
        import gptoss_jax
        try:
            gptoss_jax.load("openai/gpt-oss-20b")
        except gptoss_jax.CheckpointError as error:
            print(error)
        """,
        env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith("openai/gpt-oss-20b:") and "hub" in message and "\n" not in message


@pytest.fixture(scope="module")
def expert_heavy_checkpoint(tmp_path_factory):
    return write_hub_checkpoint(
        tmp_path_factory.mktemp("heavy") / "hub", EXPERT_HEAVY, random_hub_tensors(EXPERT_HEAVY, seed=3)
    )


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


@pytest.mark.quick
def test_loaded_model_keeps_experts_packed_within_ten_percent_of_disk(expert_heavy_checkpoint):
    model = gptoss_jax.load(expert_heavy_checkpoint, dtype="bfloat16")
    packed = jax.tree.leaves(nnx.state(model, PackedBytes))
    assert packed and all(leaf.dtype == np.uint8 for leaf in packed)
    on_disk = disk_bytes(expert_heavy_checkpoint)
    assert abs(gptoss_jax.resident_bytes(model) - on_disk) <= 0.10 * on_disk


@pytest.mark.quick
def test_experts_decoded_at_load_take_about_four_times_the_bytes(expert_heavy_checkpoint):
    # The same measure tells packed from decoded experts (4 bits against 16 per weight).
    packed = gptoss_jax.resident_bytes(gptoss_jax.load(expert_heavy_checkpoint, experts="mxfp4"))
    decoded = gptoss_jax.resident_bytes(gptoss_jax.load(expert_heavy_checkpoint, experts="bfloat16"))
    assert decoded > 3 * packed


def test_loading_peaks_well_below_two_copies_of_the_model(tmp_path):
    # About 1 GB of packed experts: big enough that fixed runtime overheads do not hide a second copy.
    config = GptOssConfig.preset("tiny").replace(
        hidden_size=1024, intermediate_size=1024, num_experts=32, num_layers=16, vocab_size=8192,
        num_heads=16, num_kv_heads=4, head_dim=64,
    )
    write_hub_checkpoint(tmp_path / "big", config, random_hub_tensors(config, seed=4))
    result = run_python(
        f"""
        import resource, jax.numpy as jnp, gptoss_jax
        jnp.zeros(1).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = gptoss_jax.load({str(tmp_path / "big")!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - before, gptoss_jax.resident_bytes(model))
        """
    )
    assert result.returncode == 0, result.stderr
    growth, resident = map(int, result.stdout.split())
    assert resident > 900e6
    assert growth <= 1.5 * resident, f"loading grew the peak RSS by {growth / resident:.2f}x the model's bytes"


# Bad input: each case gives one project error, on one line, naming what is wrong.


def assert_clear_error(error: pytest.ExceptionInfo, *names: str) -> None:
    assert isinstance(error.value, GptOssError)
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


@pytest.mark.quick
def test_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(tmp_path / "nowhere")
    assert_clear_error(error, "nowhere", "no such file")


@pytest.mark.quick
def test_a_folder_with_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(tmp_path)
    assert_clear_error(error, str(tmp_path), "no checkpoint")


@pytest.mark.quick
def test_an_index_naming_a_missing_shard(tmp_path, hub_checkpoint):
    broken = shutil.copytree(hub_checkpoint, tmp_path / "hub")
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, shard.name, "missing")


@pytest.mark.quick
@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_a_truncated_or_corrupt_safetensors_file(tmp_path, hub_checkpoint, damage):
    broken = shutil.copytree(hub_checkpoint, tmp_path / "hub")
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, shard.name)


@pytest.mark.quick
def test_a_tensor_with_the_wrong_shape(tmp_path, hub_single_file_checkpoint):
    broken = shutil.copytree(hub_single_file_checkpoint, tmp_path / "hub")
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.2.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, name, "expected")


@pytest.mark.quick
def test_a_config_whose_model_type_is_not_gpt_oss(tmp_path, hub_single_file_checkpoint):
    broken = shutil.copytree(hub_single_file_checkpoint, tmp_path / "hub")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, model_type="mixtral")))
    with pytest.raises(ConfigError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, "config.json", "model_type", "mixtral")


@pytest.mark.quick
def test_a_tensor_missing_from_the_checkpoint(tmp_path, hub_single_file_checkpoint):
    broken = shutil.copytree(hub_single_file_checkpoint, tmp_path / "hub")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.3.mlp.router.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, "model.layers.3.mlp.router.bias", "missing")


@pytest.mark.quick
@pytest.mark.parametrize("checkpoint", ["hub_checkpoint", "original_checkpoint"])
def test_big_tensors_read_in_pieces_load_the_same_weights(checkpoint, request, monkeypatch):
    # The embedding and unembedding (1.16 GB each at 20b) are read a block of rows at a time; make the
    # tiny model's count as big so that path runs, and compare with reading them whole.
    path = request.getfixturevalue(checkpoint)
    whole = gptoss_jax.load(path, dtype="float32")
    monkeypatch.setattr(importlib.import_module("gptoss_jax.checkpoint.load"), "BIG_TENSOR_BYTES", 1000)
    pieces = gptoss_jax.load(path, dtype="float32")
    for name in ("embed", "unembed"):
        np.testing.assert_array_equal(np.asarray(getattr(pieces, name)[...]), np.asarray(getattr(whole, name)[...]))


@pytest.mark.quick
def test_a_big_tensor_with_the_wrong_shape_read_in_pieces(tmp_path, hub_single_file_checkpoint, monkeypatch):
    broken = shutil.copytree(hub_single_file_checkpoint, tmp_path / "hub")
    tensors = load_file(broken / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :-1].copy()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(importlib.import_module("gptoss_jax.checkpoint.load"), "BIG_TENSOR_BYTES", 1000)
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load(broken)
    assert_clear_error(error, "lm_head.weight", "expected")


@pytest.mark.cpu_kernels
def test_a_model_holding_the_unembedding_in_blocks_loads_the_same_weights_and_decodes_the_same(
    hub_checkpoint, original_checkpoint, tmp_path, monkeypatch
):
    # The form the avx2 build's kernel reads ([V/16, D, 16], Runtime.unembedding_in_blocks), forced here on
    # any build: every way of loading gives the checkpoint's rows back, and the model runs as one with rows.
    from gptoss_jax.backends.cpu.blocks import from_blocks
    from gptoss_jax.checkpoint.converted import convert
    from gptoss_jax.inference.engine import Generator
    from gptoss_jax.inference.sampling import SamplingParams

    in_blocks = gptoss_jax.Runtime.default().replace(unembedding_blocks=True)
    rows = gptoss_jax.load(hub_checkpoint, runtime=in_blocks.replace(unembedding_blocks=False))
    expected = np.asarray(rows.unembed[...])
    vocab, hidden = expected.shape
    convert(hub_checkpoint, tmp_path / "orbax")
    models = [gptoss_jax.load(source, runtime=in_blocks) for source in (hub_checkpoint, original_checkpoint, tmp_path / "orbax")]
    monkeypatch.setattr(importlib.import_module("gptoss_jax.checkpoint.load"), "BIG_TENSOR_BYTES", 1000)
    models.append(gptoss_jax.load(hub_checkpoint, runtime=in_blocks))  # read a few blocks at a time
    for model in models:
        assert model.unembed[...].shape == (vocab // 16, hidden, 16)
        np.testing.assert_array_equal(np.asarray(from_blocks(model.unembed[...])), expected)
    # A model loaded for training keeps the checkpoint's rows (its saved weights then fit any machine).
    assert gptoss_jax.load(hub_checkpoint, runtime=in_blocks, training=True).unembed[...].shape == (vocab, hidden)
    # Logits in the kernel (3 rows) and in XLA's dot (40 rows) as with rows; greedy decoding alike.
    model = models[0]
    for count in (3, 40):
        hidden_states = jax.random.normal(jax.random.key(count), (count, hidden))
        ours, theirs = np.asarray(model.logits(hidden_states)), np.asarray(rows.logits(hidden_states))
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    prompts = [[(7 * row + i) % vocab for i in range(5 + row)] for row in range(3)]
    greedy = SamplingParams(temperature=0)
    ours, theirs = (Generator(m).generate(prompts, max_new_tokens=4, sampling=greedy) for m in (model, rows))
    assert [c.tokens for c in ours] == [c.tokens for c in theirs]
    np.testing.assert_allclose([c.logprobs for c in ours], [c.logprobs for c in theirs], rtol=1e-5)
