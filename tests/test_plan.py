"""Plans for TPUs and GPUs on this CPU-only machine: the real libtpu and CUDA compilers, abstract devices."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from eval import plan as plans
from gptoss_jax import targets
from gptoss_jax.config import GptOssConfig

TINY = GptOssConfig.preset("tiny")
# Experts dominate the bytes, as in the released models.
EXPERT_HEAVY = TINY.replace(hidden_size=256, intermediate_size=256, num_experts=16)


@pytest.mark.quick
def test_a_tpu_slice_plan_splits_the_experts_and_reports_xla_figures():
    target = targets.target("v5e-4")
    report = plans.plan(EXPERT_HEAVY, target, plans.Workload("decode", batch=4, context=256))
    assert (report["platform"], report["devices"], report["mesh"]) == ("tpu", 4, "expert=4")
    assert report["fits"] and report["memory_bytes"] == 16 * 2**30
    device = report["per_device"]
    # Each chip holds a quarter of the experts: its weights are well under the whole model's bytes.
    whole = plans.plan(EXPERT_HEAVY, targets.target("v5e-1"), plans.Workload("decode", batch=4, context=256))
    assert whole["mesh"] == "expert=1"
    assert device["weights"] < 0.5 * whole["per_device"]["weights"]
    assert device["temp"] > 0 and device["total"] >= device["weights"] + device["cache"]
    assert report["flops"] > 0 and report["bytes_accessed"] > 0
    decode = report["decode"]
    assert decode["xla_tokens_per_s"] == 4 * target.bandwidth_bytes_per_s / report["bytes_accessed"]
    assert decode["roofline_tokens_per_s"] == 4 * target.bandwidth_bytes_per_s / decode["step_bytes"]
    assert decode["xla_over_step_bytes"] == report["bytes_accessed"] / decode["step_bytes"]


@pytest.mark.quick
def test_a_gpu_plan_compiles_for_an_h100_without_one():
    report = plans.plan(TINY, targets.target("h100"), plans.Workload("prefill", batch=2, context=256, prompt_length=64))
    assert report["platform"] == "gpu" and report["fits"]
    assert 79 * 2**30 < report["memory_bytes"] <= 80 * 2**30 and report["per_device"]["total"] > 0  # "80GB"
    assert report["bytes_accessed"] is None  # XLA's GPU compiler gives no cost analysis


@pytest.mark.quick
def test_a_tpu_plan_chooses_the_tpu_algorithm_while_the_default_backend_is_the_cpu():
    assert jax.default_backend() == "cpu"
    prefill = plans.Workload("prefill", batch=1, context=256, prompt_length=128)
    on_tpu = plans.plan(TINY, targets.target("v6e-1"), prefill)
    on_cpu = plans.plan(TINY, targets.target("cpu"), prefill)
    assert on_tpu["platform"] == "tpu" and on_tpu["expert_path"] == "pallas"  # gptoss_jax/backends/tpu
    assert on_cpu["platform"] == "cpu" and on_cpu["expert_path"] not in ("grouped", "pallas")


@pytest.mark.quick
def test_an_over_size_plan_reports_xla_saying_it_does_not_fit():
    # 256 rows x 131072 positions of tiny's cache is 32 GiB, twice a v5e chip's HBM.
    report = plans.plan(TINY, targets.target("v5e-1"), plans.Workload("decode", batch=256, context=131072))
    assert not report["fits"]
    assert "RESOURCE_EXHAUSTED" in report["error"] and "\n" not in report["error"]
    # The matrix's shortcut: inputs that alone exceed the device are reported without compiling.
    quick = plans.plan(TINY, targets.target("v5e-1"), plans.Workload("decode", batch=256, context=131072),
                       compile_if_inputs_overflow=False)  # fmt: skip
    inputs = sum(quick["per_device"].values())
    assert not quick["fits"] and quick["inputs_overflow"] and inputs > 16 * 2**30
    assert f"inputs alone need {inputs / 2**30:.2f} GiB" in quick["error"]
    assert plans.matrix_cell([quick]) == f"no (inputs {inputs / 2**30:.1f} GiB)"


@pytest.mark.quick
def test_require_fit_exits_non_zero_with_one_line_saying_why():
    command = [sys.executable, "-m", "eval.bench", "--plan", "--preset", "tiny", "--target", "v5e-1",
               "--program", "decode", "--batch", "256", "--context", "131072", "--require-fit"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    verdicts = [line for line in result.stdout.splitlines() if "does not fit" in line]
    assert len(verdicts) == 1 and "RESOURCE_EXHAUSTED" in verdicts[0]
    assert "Traceback" not in result.stderr


@pytest.mark.quick
@pytest.mark.parametrize("name, platform, devices, topology", [
    ("v5e-8", "tpu", 8, "v5e:2x4"), ("v6e-1", "tpu", 1, "v6e:1x1"), ("v5p-8", "tpu", 4, "v5p:2x2x1"),
    ("v6e-16", "tpu", 16, "v6e:4x4"), ("v5p:2x2x2", "tpu", 8, "v5p:2x2x2"), ("8xh100", "gpu", 8, None),
])  # fmt: skip
def test_targets_are_named_as_users_rent_them(name, platform, devices, topology):
    target = targets.target(name)
    assert (target.platform, target.devices, target.tpu_topology) == (platform, devices, topology)
    assert len(target.abstract_devices()) == devices


@pytest.mark.quick
def test_an_unknown_target_names_the_known_ones():
    with pytest.raises(targets.TargetError, match="unknown target 'v9-8'.*h100"):
        targets.target("v9-8")


# Not in the quick tier (30 s): it compiles a plan for every model and target.
def test_the_matrix_writes_a_row_per_model_and_target_and_reuses_plans_made():
    columns = {
        "serve 8k x 1": (plans.Workload("prefill", 1, 256, 64), plans.Workload("decode", 1, 256)),
        "too big": (plans.Workload("decode", 256, 131072),),
    }
    results, saves = {}, []
    table = plans.matrix(("tiny",), ("v5e-1", "h100"), columns, results, saves.append)
    header, rule, tpu, gpu = table.splitlines()
    assert header.startswith("| model | target | mesh | serve 8k x 1 | too big |") and rule.count("|---") == 6
    # The cache of 256 x 131072 positions alone overflows a v5e chip: said without compiling.
    assert tpu.startswith("| tiny | v5e:1x1, 16 GiB | expert=1 | ") and "| no (inputs 16.3 GiB) |" in tpu
    assert gpu.startswith("| tiny | NVIDIA H100 80GB HBM3, 80 GiB | expert=1 | ") and "tok/s |" in gpu
    assert len(results) == len(saves) == 6
    again = plans.matrix(("tiny",), ("v5e-1", "h100"), columns, results, saves.append)
    assert again == table and len(saves) == 6  # nothing planned twice


@pytest.mark.quick
def test_the_cost_compile_counts_the_weights_a_tpu_program_reads_once():
    # Two layers' attention projections (gpt-oss-20b's shapes) applied to one token: the chip reads each
    # weight from HBM once. XLA's cost analysis of the program as compiled to run also counts its copies
    # of the weights into VMEM (the reason plans compile for costs without them).
    devices = targets.target("v6e-1").abstract_devices()
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    q, o = (64, 64, 2880), (2880, 64, 64)
    shapes = [(1, 1, 2880), q, o, q, o]
    args = [jax.ShapeDtypeStruct(shape, jax.numpy.bfloat16, sharding=sharding) for shape in shapes]

    def two_layers(x, *weights):
        for q_proj, o_proj in (weights[:2], weights[2:]):
            x = x + jax.numpy.einsum("bthk,dhk->btd", jax.numpy.einsum("btd,hkd->bthk", x, q_proj), o_proj)
        return x

    lowered = jax.jit(two_layers).lower(*args)
    weights = sum(arg.size * 2 for arg in args[1:])
    assert weights <= plans.cost_analysis(lowered, "tpu")["bytes accessed"] <= 1.05 * weights
    as_run = lowered.compile().cost_analysis()
    assert (as_run[0] if isinstance(as_run, list) else as_run)["bytes accessed"] > 2 * weights
