"""python -m eval.bench: the report's fields and arithmetic, beside the real peer, and plan mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import gptoss_jax
from eval import serving_bench


def run_bench(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "eval.bench", *args, "--json"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.peer
def test_bench_beside_transformers_reports_both_and_their_ratio():
    report = run_bench(
        "--preset", "tiny", "--batch", "1", "--batch", "2", "--prompt-length", "32", "--new-tokens", "65",
        "--compare", "transformers",
    )  # 64 decode steps: their time stands out of the noise of a busy machine (the 8-device runs beside it)
    for phase in ("prefill", "decode_batch_1", "decode_batch_2"):
        ours, peer = report["ours"][phase]["tokens_per_s"], report["peer"][phase]["tokens_per_s"]
        assert ours > 0 and peer > 0
        assert abs(report["ratio_ours_over_peer"][phase] - ours / peer) < 1e-9
    decode = report["ours"]["decode_batch_1"]
    assert decode["roofline_tokens_per_s"] == decode["bandwidth_bytes_per_s"] / decode["step_bytes"]
    assert decode["bandwidth_bytes_per_s"] > 1e9  # the median of probes taken around the decode timings
    assert 0 < decode["roofline_fraction"] <= 1.5  # an upper bound, up to timing noise
    assert report["model"]["packed_expert_bytes"] > 0 and report["peak_rss_bytes"] > report["model"]["resident_bytes"]


@pytest.mark.quick
def test_a_decode_time_lost_in_noise_is_an_error_not_a_rate():
    from eval.bench import seconds_per_decode_step

    assert seconds_per_decode_step(0.5, 0.9, 5, "decode batch 1") == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"decode batch 2: 5 new tokens took 0.4000 s, no longer than 1 token "
                                         r"\(0.5000 s\).*use more --new-tokens"):  # fmt: skip
        seconds_per_decode_step(0.5, 0.4, 5, "decode batch 2")


@pytest.mark.quick
def test_plan_shows_120b_decoding_at_batch_1_with_8k_context_fits_in_80_gb():
    report = run_bench("--plan", "--preset", "gpt-oss-120b", "--context", "8192", "--program", "decode")
    (decode,) = report["plans"]
    device = decode["per_device"]
    # The checkpoint is 60.8 GiB with MXFP4 experts: the plan's weights are those bytes, not a bf16 copy.
    assert abs(device["weights"] / 2**30 - 60.8) < 0.5
    assert device["cache"] > 0 and device["temp"] > 0
    assert device["total"] < 80e9


def test_plan_of_a_20b_lora_training_step_stays_far_below_the_bf16_weights():
    report = run_bench("--plan", "--train", "--preset", "gpt-oss-20b", "--context", "1024", "--lora-rank", "16")
    (training,) = report["plans"]
    device = training["per_device"]
    # Frozen weights are the MXFP4 checkpoint's 12.8 GiB; a bf16 copy of the experts alone would be 39 GiB.
    assert abs(device["weights"] / 2**30 - 12.8) < 0.1
    assert abs(training["bf16_weights_bytes"] / 2**30 - 39.0) < 0.1
    assert abs(device["optimizer"] - 2 * device["adapters"]) < 64  # AdamW: two moments (+ counts)
    assert device["total"] < 0.6 * training["bf16_weights_bytes"]


def test_serving_bench_replays_the_same_requests_through_both_batchings(hub_checkpoint):
    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    report = serving_bench.bench_serving(model, count=12, concurrency=4, prompt_length=40, min_output=2, max_output=24)
    total = report["output_tokens"]["total"]
    for name in ("static", "continuous"):
        run = report[name]
        assert run["tokens"] == total  # every request's own number of tokens, none lost or extra
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] <= run["wall_s"] and run["itl_p50_s"] <= run["itl_p99_s"]
    assert report["throughput_ratio"] == report["continuous"]["tokens_per_s"] / report["static"]["tokens_per_s"]
    assert "continuous / static throughput" in serving_bench.table(report, "cpu")


@pytest.mark.quick
def test_sampling_bench_times_our_draw_beside_jax_categorical(capsys):
    from eval import sampling_bench

    report = sampling_bench.main(["--vocab", "1500", "--batch", "1", "--batch", "3"])
    assert json.loads(capsys.readouterr().out)["batches"].keys() == {"1", "3"}
    for timings in report["batches"].values():
        assert all(timings[name] > 0 for name in ("ours_draw_ms", "jax_categorical_draw_ms", "sample_greedy_ms",
                                                  "sample_temperature_1_ms", "sample_top_p_sorted_ms",
                                                  "sample_top_p_bisection_ms"))  # fmt: skip
        assert timings["draw_speedup"] == timings["jax_categorical_draw_ms"] / timings["ours_draw_ms"]
    with pytest.raises(SystemExit) as refused:
        sampling_bench.main(["--vocab", "0"])
    assert refused.value.code == 2 and "--vocab and --batch must be at least 1" in capsys.readouterr().err
