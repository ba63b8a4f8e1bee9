"""Training on 8 simulated CPU devices: LoRA SFT and GRPO on several meshes give what one device gives, and
each device holds 1/8 of the trained state (adapters and optimizer state) and of the dense weights; two
processes stop and resume on another mesh; a converted checkpoint loads straight into its shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cli_errors import assert_one_line_error
from gptoss_jax.sharding import CPU_PROCESSES_FLAG

# FSDP alone and all three axes. (data=2, expert=4) trains in the two-process test below (steps 3 and 4,
# after resuming), against the same uninterrupted run.
MESHES = ["data=8", "data=2,expert=2,tensor=2"]
# SFT on every mesh; GRPO (whose sharded runs take twice as long: rollouts) on the one with all three axes.
SHARDED = [("sft", mesh) for mesh in MESHES] + [("grpo", MESHES[-1])]
CONVERTED_MESH = "expert=4,tensor=2"
RUNS = [f"{kind}:" for kind in ("sft", "grpo")] + [f"{kind}:{mesh}" for kind, mesh in SHARDED]
RUNS += [f"convert:{CONVERTED_MESH}"]
DEVICES = 8


@pytest.fixture(scope="module")
def runs(harmony_checkpoint, harmony_vocab_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded_runs")
    script = Path(__file__).with_name("sharded_runs.py")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), str(harmony_checkpoint), str(harmony_vocab_dir), str(out), *RUNS],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def result(out: Path, kind: str, mesh: str) -> dict:
    with np.load(out / f"{kind}-{mesh or 'one'}.npz") as data:
        return dict(data)


def adapters(run: dict) -> list[np.ndarray]:
    return [run[f"param{i}"] for i in range(sum(name.startswith("param") for name in run))]


@pytest.mark.devices
@pytest.mark.parametrize("kind,mesh", SHARDED)
def test_a_sharded_run_trains_what_one_device_trains(runs, kind, mesh):
    alone, sharded = result(runs, kind, ""), result(runs, kind, mesh)
    assert sharded["devices"] == DEVICES
    assert len(sharded["losses"]) == (4 if kind == "sft" else 3)
    np.testing.assert_allclose(sharded["losses"], alone["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sharded["rewards"], alone["rewards"])  # the same rollouts (GRPO)
    trained, reference = adapters(sharded), adapters(alone)
    assert len(trained) == len(reference) > 0
    moved = 0.0
    for ours, theirs in zip(trained, reference):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        moved = max(moved, float(np.abs(theirs).max()))
    assert moved > 1e-3  # the adapters did train (b starts at zero)


@pytest.mark.devices
@pytest.mark.parametrize("kind,mesh", SHARDED)
def test_each_device_holds_an_eighth_of_the_trained_state_and_of_the_embedding(runs, kind, mesh):
    sharded, alone = result(runs, kind, mesh), result(runs, kind, "")
    assert alone["state_share"] == 1.0 and alone["embedding_share"] == 1.0
    assert sharded["state_share"] == pytest.approx(1 / DEVICES)  # every adapter and Adam moment
    assert sharded["embedding_share"] == pytest.approx(1 / DEVICES)  # frozen dense weights: FSDP


@pytest.mark.devices
def test_a_converted_checkpoint_loads_onto_a_mesh_without_a_whole_expert_tensor_on_any_device(runs):
    result = np.load(runs / f"convert-{CONVERTED_MESH}.npz")
    assert result["expert_share"] == pytest.approx(1 / 8)  # restored straight into its shards
    np.testing.assert_array_equal(result["logits"], result["reference"])


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sft_overrides(checkpoint: Path, run_dir: Path, mesh: str) -> list[str]:
    """The run of sharded_runs.sft_config, as `key=value` overrides of the sft command."""
    from sharded_runs import sft_config
    from train.config import to_dict

    def flat(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif value is not None:
                yield f"{prefix}{key}={json.dumps(value) if isinstance(value, list) else value}"

    return list(flat(to_dict(sft_config(str(checkpoint), run_dir, mesh))))


def two_processes(arguments: list[str]) -> list[str]:
    """Run `python -m train.sft ARGUMENTS` as two processes of 4 simulated devices; their stdouts."""
    coordinator = f"127.0.0.1:{free_port()}"
    flags = f"--xla_force_host_platform_device_count=4 {CPU_PROCESSES_FLAG}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "train.sft", *arguments, "--no-progress", "--coordinator", coordinator,
             "--num-processes", "2", "--process-id", str(index)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.devices
def test_two_processes_stop_and_resume_on_another_mesh_to_the_uninterrupted_result(
    runs, harmony_checkpoint, harmony_vocab_dir, tmp_path
):
    from train.loop import MetricsLog

    run_dir = tmp_path / "run"
    # Two processes on (data=8), stopped after step 2 as a preempted job is (a checkpoint, then exit) ...
    first = two_processes([*sft_overrides(harmony_checkpoint, run_dir, "data=8"), "--stop-after", "2"])
    assert sorted(int(path.name) for path in (run_dir / "checkpoints").iterdir()) == [2]
    # ... then resumed by two processes on (data=2, expert=4) to the end.
    second = two_processes(sft_overrides(harmony_checkpoint, run_dir, "data=2,expert=4"))
    assert "step 2:" in first[0] and "step 4:" in second[0]
    # Only the first process speaks (gloo's threads log their connections on stdout, interleaved mid-line,
    # so the second's stdout is not empty: look for what our commands print) ...
    assert not any(ours in first[1] + second[1] for ours in ("step", "loss", "run in", "warning"))
    metrics = MetricsLog(run_dir / "metrics.jsonl", 4).read()
    assert [line["step"] for line in metrics] == [1, 2, 3, 4]  # ... and logs

    # The same run uninterrupted on one device: the fixture's (sharded_runs.sft_config, mesh "").
    straight = result(runs, "sft", "")
    np.testing.assert_allclose([line["loss"] for line in metrics], straight["losses"], rtol=1e-5, atol=1e-6)
    resumed = resumed_adapters(run_dir, harmony_checkpoint)
    assert len(resumed) == len(adapters(straight)) > 0
    for ours, theirs in zip(resumed, adapters(straight)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def resumed_adapters(run_dir: Path, checkpoint: Path) -> list[np.ndarray]:
    """The adapters of `run_dir`'s last checkpoint (step 4), in the order sharded_runs saves them."""
    from flax import nnx

    from sharded_runs import sft_config
    from train.loop import restore_params
    from train.model import build_model

    model = build_model(sft_config(str(checkpoint), run_dir, ""), checkpoint, rows={})
    params, step = restore_params(run_dir, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    assert step == 4
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def sft_command(arguments: list[str], devices: int = DEVICES) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "train.sft", *arguments, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


@pytest.mark.devices
def test_bad_meshes_and_foreign_checkpoints_are_one_line_errors_that_leave_nothing_behind(
    harmony_checkpoint, harmony_vocab_dir, tmp_path
):
    fresh = tmp_path / "fresh"
    # A mesh that does not divide the model: the tiny model has 2 KV heads.
    result = sft_command(sft_overrides(harmony_checkpoint, fresh, "tensor=8"))
    assert_one_line_error(result, "kv_heads axis of size 2 does not split over mesh axis tensor=8")
    assert not fresh.exists()
    # A mesh whose 'data' does not split the batch.
    result = sft_command([*sft_overrides(harmony_checkpoint, fresh, "data=8"), "batch_size=4"])
    assert_one_line_error(result, "batch_size=4 does not split over the mesh's data=8")
    assert not fresh.exists()

    run = tmp_path / "run"
    first = sft_command([*sft_overrides(harmony_checkpoint, run, ""), "batch_size=4", "steps=1"], devices=1)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    # The checkpoint of another run's config (other adapters) ...
    result = sft_command([*sft_overrides(harmony_checkpoint, run, ""), "batch_size=4", "steps=1", "lora.rank=8"])
    assert_one_line_error(result, f"{run} holds checkpoints of a run with lora.rank=4, not 8")
    # ... and a resume on a mesh the run cannot use: one with more devices than there are, one whose
    # 'data' does not split the run's batch.
    result = sft_command([*sft_overrides(harmony_checkpoint, run, "data=16"), "batch_size=4", "steps=2"])
    assert_one_line_error(result, "needs 16 devices, there are 8")
    result = sft_command([*sft_overrides(harmony_checkpoint, run, "data=8"), "batch_size=4", "steps=2"])
    assert_one_line_error(result, "batch_size=4 does not split over the mesh's data=8")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
