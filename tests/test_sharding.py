"""Sharding over 8 simulated CPU devices: same logits and tokens as one device, experts split 1/n."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptoss_jax.errors import GptOssError
from gptoss_jax.sharding import CPU_PROCESSES_FLAG, ShardingError, parse_mesh

MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"]

# Runs in a fresh process: the device count is fixed when jax starts.
CHECKS = r"""
import json, sys
import jax, numpy as np
from flax import nnx
import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.checkpoint import load as loading
from gptoss_jax.nn.moe import PackedBytes

checkpoint, tokens_file, mesh_spec = sys.argv[1:4]
tokens = np.load(tokens_file)
prompts = [tokens[0, :3].tolist(), tokens[1, :17].tolist(), tokens[0, :40].tolist()]
mesh = sharding.make_mesh(mesh_spec)
results = {"devices": jax.device_count(), "expert_layer_shard_fractions": []}

# Watch each per-layer expert tensor as the loader places it: a device must only ever get its share.
read_layer = loading._read_layer_param
def watched_read_layer(source, inner, layer, variable, layer_sharding):
    value = read_layer(source, inner, layer, variable, layer_sharding)
    if inner[:2] in (("mlp", "mlp1"), ("mlp", "mlp2")):
        largest = max(shard.data.size for shard in value.addressable_shards)
        results["expert_layer_shard_fractions"].append(largest / value.size)
    return value
loading._read_layer_param = watched_read_layer

for experts in ("mxfp4", "bfloat16"):
    model = gptoss_jax.load(checkpoint, dtype="float32", experts=experts, mesh=mesh)
    np.save(f"{tokens_file}.{mesh_spec}.{experts}.npy", np.asarray(model(tokens)))
    results[experts + "_greedy"] = gptoss_jax.generate(model, prompts, max_new_tokens=20, temperature=0)
    expert_arrays = [
        array
        for path, array in nnx.to_flat_state(nnx.state(model))
        if "mlp1" in path or "mlp2" in path
    ]
    leaves = [variable.value for variable in expert_arrays]
    results[experts + "_expert_bytes_total"] = sum(leaf.nbytes for leaf in leaves)
    results[experts + "_expert_bytes_per_device"] = sorted(set(sharding.device_bytes(leaves).values()))

# bf16 runs the CPU kernels' expert paths inside shard_map: the sorted grouped kernel for the long
# batch, the fused matvec for a short one.
model = gptoss_jax.load(checkpoint, dtype="bfloat16", mesh=mesh)
np.save(f"{tokens_file}.{mesh_spec}.bf16.npy", np.asarray(model(tokens)))
np.save(f"{tokens_file}.{mesh_spec}.bf16-short.npy", np.asarray(model(tokens[:, :3])))

print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def single_device(hub_checkpoint, long_tokens):
    import gptoss_jax

    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    prompts = [long_tokens[0, :3].tolist(), long_tokens[1, :17].tolist(), long_tokens[0, :40].tolist()]
    bf16 = gptoss_jax.load(hub_checkpoint, dtype="bfloat16")
    return (
        np.asarray(model(long_tokens)),
        gptoss_jax.generate(model, prompts, max_new_tokens=20, temperature=0),
        {"bf16": np.asarray(bf16(long_tokens)), "bf16-short": np.asarray(bf16(long_tokens[:, :3]))},
    )


@pytest.mark.devices
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_model_matches_one_device_and_splits_the_experts(
    mesh, hub_checkpoint, long_tokens, single_device, tmp_path
):
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, long_tokens)
    result = subprocess.run(
        [sys.executable, "-c", CHECKS, str(hub_checkpoint), str(tokens_file), mesh],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["devices"] == 8

    logits, greedy, bf16_logits = single_device
    sizes = parse_mesh(mesh)
    expert_split = sizes.get("expert", 1) * sizes.get("tensor", 1)
    for experts in ("mxfp4", "bfloat16"):
        sharded = np.load(f"{tokens_file}.{mesh}.{experts}.npy")
        assert np.abs(sharded - logits).max() / np.abs(logits).max() <= 1e-5
        assert results[experts + "_greedy"] == greedy
        # Every device holds exactly its 1/n of every expert array.
        assert results[experts + "_expert_bytes_per_device"] == [results[experts + "_expert_bytes_total"] // expert_split]
    for name, expected in bf16_logits.items():  # the same bf16 roundings, summed in another order
        sharded = np.load(f"{tokens_file}.{mesh}.{name}.npy")
        assert np.abs(sharded - expected).max() / np.abs(expected).max() <= 1e-2, name
    # Loading placed every layer's expert tensors straight into shards: no device saw a whole one.
    assert results["expert_layer_shard_fractions"]
    assert set(results["expert_layer_shard_fractions"]) == {1 / expert_split}


@pytest.mark.quick
def test_a_mesh_that_does_not_fit_the_model_is_a_clear_error(hub_checkpoint):
    import jax

    from gptoss_jax import sharding
    from gptoss_jax.sharding import spec_for

    with pytest.raises(ShardingError, match="experts axis of size 8"):
        mesh = jax.sharding.AbstractMesh((1, 3, 1), sharding.MESH_AXES)
        spec_for(("experts", "embed"), (8, 128), mesh, "mlp1")


@pytest.mark.quick
@pytest.mark.parametrize("spec", ["expert=0", "pipeline=2", "expert"])
def test_bad_mesh_specs_are_refused(spec):
    with pytest.raises(GptOssError, match="axis=size"):
        parse_mesh(spec)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.devices
def test_two_processes_generate_what_one_process_does(hub_checkpoint):
    # Two local processes of 4 CPU devices each form one 8-device mesh through jax.distributed.
    common = [
        sys.executable, "-m", "eval.generate", "--checkpoint", str(hub_checkpoint), "--prompt-ids", "5,6,7,8",
        "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32", "--json",
    ]
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {CPU_PROCESSES_FLAG}",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    processes = [
        subprocess.Popen(
            [*common, "--mesh", "expert=4,tensor=2", "--coordinator", coordinator, "--num-processes", "2",
             "--process-id", str(index)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    alone = subprocess.run(common, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    # gloo logs its connections on stdout; the JSON lines are ours.
    first, second = ([line for line in stdout.splitlines() if line.startswith("{")] for stdout, _ in outputs)
    assert [json.loads(line)["tokens"] for line in first] == [json.loads(alone.stdout)["tokens"]]
    assert second == []  # only the first process prints
