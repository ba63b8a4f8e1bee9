"""The one place that decides which algorithm runs where.

A `Runtime` names the platform the model's programs are compiled for (taken from the devices or mesh
the model is placed on, never from `jax.default_backend()`, which stays "cpu" while compiling ahead of
time for a TPU or GPU), which kernels exist there, and the knobs a user or a test may force: the expert
algorithm and the attention block sizes. Models carry one (`model.runtime`); generators, trainers and
the bench use the model's. Environment variables are user overrides, read here and, for how the CPU
kernels are built and loaded, in gptoss_jax.backends.cpu and nowhere else:

  GPTOSS_JAX_EXPERT_PATH=NAME       force an expert algorithm (one of EXPERT_PATHS)
  GPTOSS_JAX_KERNELS=0              do not use the CPU or TPU kernels (XLA's paths everywhere)
  GPTOSS_JAX_KERNEL_VARIANT=NAME    the CPU kernels' build (see backends/cpu/build.py), not this CPU's best
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from gptoss_jax.backends.cpu.blocks import holds_blocks

PLATFORMS = ("cpu", "gpu", "tpu")
# How the experts run (see `Runtime.expert_path_for`); "auto" lets the runtime choose per shape.
EXPERT_PATHS = ("auto", "fused", "sorted", "gathered", "tiled", "grouped", "pallas")
# Paths that need the CPU kernels.
KERNEL_EXPERT_PATHS = ("fused", "sorted")

# Up to this many (token, expert) pairs per expert on average, the fused kernel (reading packed bytes
# once per step) beats decoding them for a matmul: float32 rows against the tiled path; bf16 rows (two
# products an instruction) against the sorted kernel, measured even at 8 on an AVX512-BF16 machine.
FUSED_MAX_PAIRS_PER_EXPERT = 2
FUSED_MAX_PAIRS_PER_EXPERT_BF16 = 6
# bf16 rows taken as int16 (x86 with AVX2) on a build whose sorted kernel runs float32 FMA panels (avx2,
# avx512): decoding a whole expert to float32 panels costs ~7x the fused kernel's decoding, so the fused
# kernel wins far longer. mlp1 of 20b (32 experts) on a 2-core Zen 4, fused / sorted: 4 pairs an expert
# 30.7 / 68.1 ms, 8 57.9 / 88.8, 16 113.1 / 132.0, 32 236.2 / 230.8 (avx2; avx512 alike).
FUSED_MAX_PAIRS_PER_EXPERT_INT16 = 24


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where the model runs and how: a static, hashable value (changing it recompiles)."""

    platform: str = "cpu"
    # The CPU kernel build in use (its variant's name, e.g. "avx512bf16"), or None for XLA's paths.
    cpu_kernels: str | None = None
    # Whether that build multiplies bf16 pairs in hardware (AVX512-BF16): the wider fused range pays off
    # only then.
    bf16_products: bool = False
    # Whether its fused kernel takes bf16 rows as int16 (x86 with AVX2): without bf16 products, the widest
    # fused range (FUSED_MAX_PAIRS_PER_EXPERT_INT16).
    int16_rows: bool = False
    # Whether its grouped matmul runs register tiles (AVX512-BF16, or float32 FMA panels on AVX2): only
    # then does it beat XLA's tiled path for many pairs.
    grouped_tiles: bool = False
    # Whether a bf16 model holds its unembedding in blocks of 16 rows (gptoss_jax.backends.cpu.blocks), the
    # form that build's matvec reads fastest at a batch's rows (AVX2: outer products, not dot products).
    unembedding_blocks: bool = False
    expert_path: str = "auto"
    # Which backend's Pallas kernels run the MXFP4 experts: "tpu" (gptoss_jax/backends/tpu: the model keeps
    # its experts in the TPU form, decoded in VMEM) or "gpu" (backends/gpu: Triton, the checkpoint's
    # layout), or None. The platform's own by default; another's only in interpret mode (tests).
    pallas: str | None = None
    # Run the Pallas kernels in Pallas' interpreter (any platform; slow: small shapes only).
    interpret: bool = False
    # Unroll the layer scan. Only for XLA's cost analysis (plans): it counts a loop's body once, whatever
    # the number of iterations, so a rolled scan's flops and bytes are one layer group's.
    unroll_layers: bool = False
    # A long sequence attending to itself runs this many queries a block: a block's scores stay in
    # cache (on a CPU, 32 queries of a 512-token prompt ran attention over 2x faster than 256) ...
    attention_block: int = 32
    # ... and full-attention layers walk the keys this many at a time (an online softmax).
    key_block: int = 256

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"runtime platform must be one of {PLATFORMS}, got {self.platform!r}")
        if self.expert_path not in EXPERT_PATHS:
            raise ValueError(f"expert_path must be one of {EXPERT_PATHS}, got {self.expert_path!r}")
        if self.expert_path in KERNEL_EXPERT_PATHS and self.cpu_kernels is None:
            raise ValueError(f"expert_path {self.expert_path!r} needs the CPU kernels, which this runtime lacks")
        if self.unembedding_blocks and self.cpu_kernels is None:
            raise ValueError("unembedding_blocks needs the CPU kernels, which this runtime lacks")
        if self.cpu_kernels is not None and self.platform != "cpu":
            raise ValueError(f"the CPU kernels cannot run on platform {self.platform!r}")
        if self.pallas not in (None, "tpu", "gpu"):
            raise ValueError(f"pallas must be 'tpu', 'gpu' or None, got {self.pallas!r}")
        if self.pallas and self.platform != self.pallas and not self.interpret:
            raise ValueError(f"the Pallas {self.pallas} kernels run on platform {self.platform!r} only with interpret=True")
        if self.expert_path == "pallas" and not self.pallas:
            raise ValueError("expert_path 'pallas' needs the Pallas kernels (pallas='tpu' or 'gpu')")

    @classmethod
    def for_platform(cls, platform: str, *, kernels: bool = True, **options) -> "Runtime":
        """The runtime for `platform` with its kernels (built now, outside any trace, if they must be).

        kernels=False, or GPTOSS_JAX_KERNELS=0 in the environment, keeps to XLA's own paths.
        """
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
        if os.environ.get("GPTOSS_JAX_EXPERT_PATH") and "expert_path" not in options:
            options["expert_path"] = os.environ["GPTOSS_JAX_EXPERT_PATH"]
        kernels = kernels and os.environ.get("GPTOSS_JAX_KERNELS", "1") != "0"
        if platform == "cpu" and kernels and not options.get("pallas"):
            status = _cpu_kernel_status()
            if status.available:
                return cls("cpu", cpu_kernels=status.variant, bf16_products=status.bf16_products,
                           int16_rows=status.int16_rows, grouped_tiles=status.grouped_tiles,
                           unembedding_blocks=status.unembedding_blocks, **options)
        if platform in ("tpu", "gpu") and kernels:
            options.setdefault("pallas", platform)
        return cls(platform, **options)

    @classmethod
    def for_devices(cls, devices: Sequence[jax.Device], **options) -> "Runtime":
        """The runtime for programs placed on `devices` (a mesh's devices, or abstract TPU/GPU ones)."""
        platforms = {device.platform for device in devices}
        if len(platforms) != 1:
            raise ValueError(f"devices of one platform expected, got {sorted(platforms)}")
        return cls.for_platform(platforms.pop(), **options)

    @classmethod
    def default(cls) -> "Runtime":
        """The runtime for jax's default devices (what an unplaced model runs on)."""
        return _default_runtime()

    def on(self, devices: Sequence[jax.Device]) -> "Runtime":
        """This runtime's choices, moved to `devices` (a forced kernel path that cannot run there is dropped;
        a runtime told to do without the CPU kernels still does)."""
        kept = {"attention_block": self.attention_block, "key_block": self.key_block}
        if self.interpret:  # a test's interpreted kernels stay interpreted wherever the model goes
            kept.update(pallas=self.pallas, interpret=True)
        kernels = self.cpu_kernels is not None or self.pallas is not None or self.platform == "cpu"
        runtime = Runtime.for_devices(devices, kernels=kernels, **kept)
        if self.expert_path in KERNEL_EXPERT_PATHS and runtime.cpu_kernels is None:
            return runtime
        return dataclasses.replace(runtime, expert_path=self.expert_path)

    def for_training(self) -> "Runtime":
        """The runtime a model is built with for training: the unembedding kept as the checkpoint has it, so
        that a run's saved weights, exports and resumes never depend on the CPU that trained it (see
        unembedding_in_blocks); training unembeds 1024 tokens at a time, XLA's dot either way."""
        return dataclasses.replace(self, unembedding_blocks=False)

    def replace(self, **changes) -> "Runtime":
        return dataclasses.replace(self, **changes)

    def without_kernels(self) -> "Runtime":
        """The same choices on XLA's own paths (a forced kernel path falls back to "auto")."""
        path = "auto" if self.expert_path in (*KERNEL_EXPERT_PATHS, "pallas") else self.expert_path
        return dataclasses.replace(self, cpu_kernels=None, bf16_products=False, int16_rows=False,
                                   grouped_tiles=False, unembedding_blocks=False, expert_path=path, pallas=None,
                                   interpret=False)

    @property
    def expert_form(self) -> str:
        """How a model built for this runtime holds MXFP4 experts: "tpu" (gptoss_jax.backends.tpu's
        to_tpu_form, for the Pallas kernels) or "checkpoint" (as the checkpoint stores them)."""
        return "tpu" if self.pallas == "tpu" else "checkpoint"

    @property
    def whole_stacks(self) -> tuple[str, ...]:
        """Which stacked weights the layer scan passes whole (with the layer's index) instead of slicing a
        layer out per step, where XLA's slice would copy it: "experts" (packed expert bytes) and
        "attention" (its projections). The CPU kernels read both in place; a Pallas kernel the experts
        (handed a slice, a custom call gets a copy of the layer's experts every step)."""
        if self.cpu_kernels is not None:
            return ("experts", "attention")
        return ("experts",) if self.pallas else ()

    @property
    def gathers_bits(self) -> bool:
        """Whether embedding rows are gathered as their uint16 bits (gptoss_jax.nn.ops.embedding_rows): XLA's
        CPU backend otherwise converts the whole bf16 table to float32 first; elsewhere the bitcast can
        itself copy the table."""
        return self.platform == "cpu"

    @property
    def writes_cache_by_select(self) -> bool:
        """Whether a decode step writes its KV token by a select over the slots (LayerCache.write): a TPU
        keeps the cache with its slots on lanes and copied it to row-major and back around a scatter."""
        return self.platform == "tpu"

    def decodes_in_place(self, cache_dtype, mesh) -> bool:
        """Whether a decode step's attention is a kernel that writes and reads each layer group's cache in
        place in the stack: the TPU's (gptoss_jax.backends.tpu.attention.decode_attention), or the CPU
        kernels' for a bf16 cache on one device (gptoss_jax.backends.cpu.decode_attention; XLA's CPU
        path copies, converts and transposes each layer's whole cache every step)."""
        if self.pallas == "tpu":
            return True
        return self.cpu_kernels is not None and mesh is None and jnp.dtype(cache_dtype) == jnp.bfloat16

    @property
    def logprob_chunk(self) -> int:
        """Tokens unembedded at a time for training's token log-probs: float32 logits of a chunk and their
        gradient are [chunk, vocab] each (0.8 GB at 1024 tokens of gpt-oss's vocabulary). A CPU ran 1024
        fastest; an accelerator's unembedding is fast at 256 too, and its memory is the scarce thing."""
        return 1024 if self.platform == "cpu" else 256

    @property
    def sampling_sorts(self) -> bool:
        """Whether top-k / top-p sampling sorts the vocabulary (gptoss_jax.inference.sampling): on a GPU
        only. The same cutoffs come from a bisection elsewhere: a TPU's sort of a [batch, vocab] block keeps
        8x padded copies of it (the batch on lanes), and XLA's CPU sort took 42 ms a row of gpt-oss's
        vocabulary (a whole top-p sample at one row: 43.3 ms sorted, 1.8 by bisection; at 16 rows 700
        and 48; `python -m eval.sampling_bench`)."""
        return self.platform == "gpu"

    def unembedding_in_blocks(self, vocab_size: int, dtype) -> bool:
        """Whether a model of this dtype built for this runtime holds its unembedding in blocks of 16 rows
        ([V/16, K, 16]; the model reads either form, whichever it holds). Only bf16: the kernel's."""
        return self.unembedding_blocks and jnp.dtype(dtype) == jnp.bfloat16 and holds_blocks(vocab_size)

    def embedding_width(self, hidden: int) -> int:
        """Columns the embedding table is stored with. A TPU lays a [vocab, hidden] table out with the
        vocabulary on lanes when hidden is not a multiple of 128 (gpt-oss's 2880), and then copies the
        whole table (1.2 GB) to gather a step's rows; zero columns up to a multiple of 128 (2944: 2% more)
        keep it row-major and the gather reads only the rows."""
        return -(-hidden // 128) * 128 if self.platform == "tpu" else hidden

    def expert_path_for(
        self, pairs: int, num_experts: int, *, packed: bool, bf16: bool, adapters: bool, tpu_form: bool = False
    ) -> str:
        """How the experts run for `pairs` (token, chosen expert) pairs (tpu_form: packed experts held in the
        TPU form).

        pallas: MXFP4 weights with the Pallas kernels (TPU: weights in the TPU form; GPU: Triton; or
          interpreted): rows sorted by expert in whole tiles, one grouped kernel call a projection that
          decodes the packed bytes on chip, each expert's once per tile of its rows.

        fused: CPU kernels, MXFP4 weights, decode-sized batches; one kernel reads each chosen expert's
          packed bytes once and applies them to every token that chose it.
        sorted: CPU kernels whose grouped matmul runs register tiles (bf16 products, or float32 FMA panels
          on AVX2, AVX-512 and NEON), MXFP4 weights, bf16, more pairs (prefill, training without expert
          adapters): pairs sorted by expert, one grouped kernel call a projection.
        gathered: few pairs elsewhere; each pair decodes its expert's weights.
        tiled: CPU otherwise: pairs sorted by expert in tiles of one expert each; a tile decodes its
          expert's weights and runs the expert MLP (XLA's CPU ragged_dot computes every group for every row).
        grouped: GPU and TPU: jax.lax.ragged_dot over all experts' decoded weights.
        """
        if packed and (tpu_form or self.pallas == "gpu"):
            if self.expert_path not in ("auto", "pallas", *KERNEL_EXPERT_PATHS):  # an XLA path, forced
                return self.expert_path
            if self.pallas == ("tpu" if tpu_form else "gpu"):  # the kernels for the form the weights are in
                return "pallas"
            return "gathered" if pairs <= num_experts else ("tiled" if self.platform == "cpu" else "grouped")
        if self.expert_path == "pallas":  # the weights are not in its form
            return self.without_kernels().expert_path_for(pairs, num_experts, packed=packed, bf16=bf16, adapters=adapters)
        if self.expert_path != "auto" and (packed or self.expert_path not in KERNEL_EXPERT_PATHS):
            return self.expert_path
        kernels = self.cpu_kernels is not None and packed
        if kernels and bf16 and self.bf16_products:
            fused_limit = FUSED_MAX_PAIRS_PER_EXPERT_BF16
        elif kernels and bf16 and self.int16_rows:
            fused_limit = FUSED_MAX_PAIRS_PER_EXPERT_INT16
        else:
            fused_limit = FUSED_MAX_PAIRS_PER_EXPERT
        if kernels and pairs <= fused_limit * num_experts:
            return "fused"
        if kernels and bf16 and self.grouped_tiles and not adapters:
            return "sorted"
        if pairs <= num_experts:
            return "gathered"
        return "tiled" if self.platform == "cpu" else "grouped"


def _cpu_kernel_status():
    """The CPU kernels usable here (cpu.KernelStatus: their variant, or why there is none)."""
    from gptoss_jax.backends import cpu

    return cpu.load_kernels()


@functools.cache
def _default_runtime() -> Runtime:
    return Runtime.for_devices(jax.devices())
