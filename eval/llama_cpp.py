"""llama.cpp as the bench's peer (`python -m eval.bench --compare llama.cpp`): the same weights as a GGUF,
run by llama.cpp's own benchmark programs on this machine's cores.

llama.cpp is not a Python dependency: point `--llama-cpp` (or $GPTOSS_JAX_LLAMA_CPP) at a folder holding
its `llama-bench` and `llama-batched-bench`, or have them on PATH. Building them from source (CPU only,
`-march=native` through GGML_NATIVE) takes about 15 minutes on 2 cores:

    git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j --target llama-bench llama-batched-bench    # binaries in build/bin

(`pip download --no-binary :all: --no-deps llama-cpp-python` carries the same source in vendor/llama.cpp.)

Prefill is `llama-bench -p N -n 0` (a prompt of N tokens in one batch); decode at each batch size B is
`llama-batched-bench -npp 16 -ntg T -npl B`: B sequences with 16-token prompts, then T tokens each, its
aggregate generation rate (B x T / seconds), as the bench measures ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from gptoss_jax.errors import GptOssError

ENV_VAR = "GPTOSS_JAX_LLAMA_CPP"
PROGRAMS = ("llama-bench", "llama-batched-bench")
DECODE_PROMPT = 16  # the prompt length of the bench's own decode measurements
REPEATS = 3


class LlamaCppError(GptOssError):
    """llama.cpp's programs are missing or failed."""


def find_programs(folder: str | None) -> dict[str, Path]:
    """The llama.cpp programs: in `folder` (or its bin/), else $GPTOSS_JAX_LLAMA_CPP, else on PATH."""
    folder = folder or os.environ.get(ENV_VAR)
    found = {}
    for program in PROGRAMS:
        if folder:
            candidates = [Path(folder) / program, Path(folder) / "bin" / program]
            path = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        else:
            path = Path(shutil.which(program)) if shutil.which(program) else None
        if path is None:
            where = f"in {folder}" if folder else f"on PATH (or set --llama-cpp / ${ENV_VAR})"
            raise LlamaCppError(f"{program} not found {where}; see eval/llama_cpp.py for the build command")
        found[program] = path
    return found


def bench(gguf: Path, programs: dict[str, Path], prompt_length: int, batches: list[int], new_tokens: int,
          threads: int) -> dict:  # fmt: skip
    """Prefill and decode tokens/s of llama.cpp on `gguf`, in the bench's report shape."""
    common = ["-m", str(gguf), "-t", str(threads)]
    rows = _run(programs["llama-bench"], [*common, "-p", str(prompt_length), "-n", "0", "-r", str(REPEATS),
                                          "-o", "json"], json_lines=False)  # fmt: skip
    prefill = rows[0]
    results: dict = {
        "name": f"llama.cpp {prefill.get('build_commit', '?')} (build {prefill.get('build_number', '?')}), "
                f"{threads} threads",
        "prefill": {"prompt_tokens": prompt_length, "tokens_per_s": float(prefill["avg_ts"])},
    }
    context = max(batches) * (DECODE_PROMPT + new_tokens) + 64
    for batch in batches:
        lines = _run(programs["llama-batched-bench"], [*common, "-c", str(context), "-npp", str(DECODE_PROMPT),
                                                       "-ntg", str(new_tokens), "-npl", str(batch),
                                                       "--output-format", "jsonl"], json_lines=True)  # fmt: skip
        results[f"decode_batch_{batch}"] = {"tokens_per_s": float(lines[-1]["speed_tg"])}
    return results


def _run(program: Path, arguments: list[str], json_lines: bool) -> list[dict]:
    command = [str(program), *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppError(f"{program.name} exited with {done.returncode}: {last}")
    try:
        if json_lines:
            return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise LlamaCppError(f"{program.name}: unreadable output ({error})") from None
