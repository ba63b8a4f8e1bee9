"""The hardware our users rent, as data: what a plan compiles for and measures against.

A `Target` names a machine: its platform, how many devices, each device's memory and bandwidth, and how
to get abstract devices of it on a machine that has none (a TPU topology through libtpu; a GPU target
config through jax's CUDA plugin). `TARGETS` is the one table; add a row for another machine. TPU slices
not in the table are named by topology ("v6e:4x4", "v5p:2x2x2") or by chip count ("v6e-16", "v5p-32").

Figures are public specs: memory per device (for GPUs the total the driver reports), and memory
bandwidth in bytes per second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile

from gptoss_jax.errors import GptOssError

GiB = 2**30


class TargetError(GptOssError):
    """A target that is unknown, or whose compiler is not installed."""


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """One TPU generation: per-chip HBM and its bandwidth, and how a slice name counts chips."""

    generation: str  # libtpu's topology prefix: v4, v5e, v5p, v6e
    memory_bytes: int
    bandwidth_bytes_per_s: float
    # v4 and v5p slices are named by TensorCores (two a chip, one jax device): v5p-8 is 4 chips.
    cores_per_chip: int = 1


TPU_CHIPS = {
    "v4": TpuChip("v4", 32 * GiB, 1200e9, cores_per_chip=2),
    "v5e": TpuChip("v5e", 16 * GiB, 819e9),
    "v5p": TpuChip("v5p", 95 * GiB, 2765e9, cores_per_chip=2),
    "v6e": TpuChip("v6e", 32 * GiB, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler needs to know of one NVIDIA GPU (a GpuTargetConfigProto's device info)."""

    description: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    compute_capability: tuple[int, int]
    core_count: int  # streaming multiprocessors
    fpus_per_core: int
    clock_rate_ghz: float
    l2_cache_bytes: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    threads_per_core_limit: int = 2048

    def target_config(self) -> str:
        """The GpuTargetConfigProto in text form, as jax's CUDA plugin takes it."""
        major, minor = self.compute_capability
        return (
            "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
            f"shared_memory_per_core: {self.shared_memory_per_core} threads_per_core_limit: {self.threads_per_core_limit} "
            f"core_count: {self.core_count} fpus_per_core: {self.fpus_per_core} block_dim_limit_x: 2147483647 "
            f"block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {int(self.bandwidth_bytes_per_s)} "
            f"l2_cache_size: {self.l2_cache_bytes} clock_rate_ghz: {self.clock_rate_ghz} "
            f"device_memory_size: {self.memory_bytes} "
            f"shared_memory_per_block_optin: {self.shared_memory_per_block_optin} "
            f"cuda_compute_capability {{ major: {major} minor: {minor} }} registers_per_core_limit: 65536 "
            "registers_per_block_limit: 65536 } "
            'platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 } '
            "runtime_version { major: 12 minor: 8 patch: 0 } "
            f'device_description_str: "{self.description}"'
        )


MiB = 2**20
# Memory is what the driver reports as the device's total (nvidia-smi), a little under the marketed GB.
GPUS = {
    "t4": GpuSpec("Tesla T4", 15360 * MiB, 320e9, (7, 5), 40, 64, 1.59, 4 * MiB, 65536, 65536, 1024),
    "l4": GpuSpec("NVIDIA L4", 23034 * MiB, 300e9, (8, 9), 58, 128, 2.04, 48 * MiB, 102400, 101376, 1536),
    "a100-40gb": GpuSpec("NVIDIA A100-SXM4-40GB", 40960 * MiB, 1555e9, (8, 0), 108, 64, 1.41, 40 * MiB, 167936, 166912),
    "a100-80gb": GpuSpec("NVIDIA A100-SXM4-80GB", 81920 * MiB, 2039e9, (8, 0), 108, 64, 1.41, 40 * MiB, 167936, 166912),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 81559 * MiB, 3352e9, (9, 0), 132, 128, 1.98, 50 * MiB, 233472, 232448),
    "h200": GpuSpec("NVIDIA H200", 143771 * MiB, 4800e9, (9, 0), 132, 128, 1.98, 50 * MiB, 233472, 232448),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine a plan compiles for: `devices` devices of one kind."""

    name: str
    platform: str  # "cpu", "gpu" or "tpu"
    devices: int
    memory_bytes: int | None  # per device (None: the host's, not judged)
    bandwidth_bytes_per_s: float | None  # per device
    tpu_topology: str | None = None  # libtpu's name, e.g. "v5e:2x4"
    gpu: GpuSpec | None = None

    @property
    def description(self) -> str:
        if self.platform == "cpu":
            return "this machine's CPU"
        memory = f"{self.memory_bytes / GiB:.0f} GiB" if self.memory_bytes else "?"
        kind = self.tpu_topology or self.gpu.description
        return f"{self.devices} x {kind}, {memory} each" if self.devices > 1 else f"{kind}, {memory}"

    def abstract_devices(self) -> list:
        """Devices of this target to compile for, on any machine (TPU and GPU ones need `gptoss_jax[plan]`)."""
        import jax

        if self.platform == "cpu":
            devices = jax.devices("cpu")
            if len(devices) < self.devices:
                raise TargetError(f"target {self.name} needs {self.devices} CPU devices, this process has {len(devices)}")
            return devices[: self.devices]
        from jax.experimental import topologies

        if self.platform == "tpu":
            _require("libtpu", "TPU")
            # libtpu lets one process at a time hold it, for the chips; compiling needs none, so a plan
            # may run beside another (a test suite, a second plan).
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            generation, shape = self.tpu_topology.split(":")
            bounds = [int(n) for n in shape.split("x")]
            options = {}
            if math.prod(bounds) < 4:  # libtpu's default host holds 2x2 chips; a smaller slice is one host
                options["chips_per_host_bounds"] = tuple(bounds + [1] * (3 - len(bounds)))
            with _quiet_stderr("libtpu"):
                topology = topologies.get_topology_desc(platform="tpu", topology_name=self.tpu_topology, **options)
        else:
            _require("jax_plugins.xla_cuda12", "GPU")
            with _quiet_stderr("the CUDA plugin"):
                topology = topologies.get_topology_desc(
                    platform="cuda", target_config=self.gpu.target_config(), topology=f"1x1x{self.devices}"
                )
        if len(topology.devices) != self.devices:
            raise TargetError(f"target {self.name}: libtpu gave {len(topology.devices)} devices, not {self.devices}")
        return list(topology.devices)


def _target_table() -> dict[str, Target]:
    table = {"cpu": Target("cpu", "cpu", 1, None, None)}
    for name in GPUS:
        table[name] = gpu_host(name)
    for name in ("8xa100-80gb", "8xh100", "8xh200"):
        table[name] = gpu_host(name)
    for name in ("v5e-1", "v5e-4", "v5e-8", "v6e-1", "v6e-4", "v6e-8", "v5p-8", "v4-8"):
        table[name] = tpu_slice(name)
    return table


# TPU slices by chip count -> the topology libtpu knows them by (v5e/v6e are 2-D, v4/v5p 3-D).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}


def tpu_slice(name: str) -> Target:
    """A TPU slice from its name: 'v6e-8' (chips, or TensorCores on v4/v5p) or a topology 'v5p:2x2x2'."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name)
    if not match:
        raise TargetError(f"unknown target {name!r}: expected one of {', '.join(TARGETS)} or a TPU topology")
    chip = TPU_CHIPS[match.group(1)]
    if match.group(3):
        shape = match.group(3)
    else:
        cores = int(match.group(2))
        chips, rest = divmod(cores, chip.cores_per_chip)
        shapes = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
        if rest or chips not in shapes:
            raise TargetError(f"unknown TPU slice {name!r}: sizes are {', '.join(str(n * chip.cores_per_chip) for n in shapes)}")
        shape = shapes[chips]
    chips = math.prod(int(n) for n in shape.split("x"))
    return Target(name, "tpu", chips, chip.memory_bytes, chip.bandwidth_bytes_per_s, tpu_topology=f"{chip.generation}:{shape}")


def gpu_host(name: str) -> Target:
    """A host of one or more GPUs of one kind: 'h100', '8xh100'."""
    count, _, kind = name.partition("x") if re.fullmatch(r"\d+x.+", name) else ("1", "", name)
    if kind not in GPUS:
        raise TargetError(f"unknown GPU {kind!r} in target {name!r}: known GPUs are {', '.join(GPUS)}")
    spec = GPUS[kind]
    return Target(name, "gpu", int(count), spec.memory_bytes, spec.bandwidth_bytes_per_s, gpu=spec)


TARGETS: dict[str, Target] = _target_table()


def target(name: str) -> Target:
    """The target called `name`: a row of TARGETS, a GPU host ('4xl4'), or a TPU slice by chip count or topology."""
    name = name.strip().lower()
    if name in TARGETS:
        return TARGETS[name]
    if re.fullmatch(r"\d+x[a-z].*", name):
        return gpu_host(name)
    return tpu_slice(name)


def _require(module: str, kind: str) -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise TargetError(f'compiling for a {kind} needs its compiler: pip install "gptoss_jax[plan]" (no {kind} needed)')


@contextlib.contextmanager
def _quiet_stderr(what: str):
    """Hide a native library's start-up chatter on file descriptor 2 (shown again if the call fails)."""
    with tempfile.TemporaryFile(mode="w+b") as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except Exception as error:
            os.dup2(saved, 2)
            capture.seek(0)
            chatter = capture.read().decode(errors="replace").strip()
            raise TargetError(f"{what} could not describe the target: {str(error).splitlines()[0]}"
                              + (f" ({chatter.splitlines()[-1]})" if chatter else "")) from error  # fmt: skip
        finally:
            os.dup2(saved, 2)
            os.close(saved)
