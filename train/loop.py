"""What every fine-tuning loop shares: the library's training step (gptoss_jax.training) run under jit,
orbax checkpoints that resume exactly, and the metrics log."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptoss_jax.errors import ConfigError
from gptoss_jax.nn import GptOss
from gptoss_jax.training import LossFn, OptimizerConfig, TrainStep


@contextlib.contextmanager
def setting_up(run_dir: Path) -> Iterator[None]:
    """Create `run_dir` for a run's setup (loading, placing, restoring); should the setup fail, a run_dir
    this call created goes again, so bad input leaves nothing half-made on disk."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and jax.process_index() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def checkpoint_handlers() -> dict:
    """What a training checkpoint holds: the trained parameters, the optimizer state, the progress."""
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "progress": ocp.JsonCheckpointHandler(),
    }


class Trainer:
    """Runs a TrainStep from step 0 or from the latest checkpoint in run_dir.

    Checkpoints go to run_dir/checkpoints (orbax: written to a temporary name, then renamed); the last
    `keep` are kept.
    """

    def __init__(
        self,
        model: GptOss,
        trainable: Any,
        optimizer: OptimizerConfig,
        steps: int,
        run_dir: str | Path,
        *,
        loss_fn: LossFn,
        seed: int = 0,
        keep: int = 3,
        use_dropout: bool = False,
        row_axes: dict[str, int] | None = None,
    ):
        """row_axes: the axis of each batch array that holds its rows, where it is not 1 ([micro-batches,
        rows, ...]): on a mesh, rows are split over 'data'."""
        self.train_fn = step = TrainStep(model, trainable, optimizer, steps, loss_fn, use_dropout)
        self.mesh = step.mesh
        self.row_axes = row_axes or {}
        if self.mesh is None:
            self.params = step.initial_params
            self.opt_state = step.optimizer.init(self.params)
            self._step = jax.jit(step, donate_argnums=(0, 1))
        else:  # every part of the state stays where TrainStep places it, step after step
            self.params = jax.device_put(step.initial_params, step.param_shardings)
            opt_shardings = step.opt_state_shardings(jax.eval_shape(step.optimizer.init, self.params))
            self.opt_state = jax.jit(step.optimizer.init, out_shardings=opt_shardings)(self.params)
            out_shardings = (step.param_shardings, opt_shardings, step.replicated())
            self._step = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
        self.step = 0
        self.examples_seen = 0
        self.key = jax.random.key(seed)
        self.run_dir = Path(run_dir)
        self.manager = ocp.CheckpointManager(
            (self.run_dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_handlers=checkpoint_handlers(),
        )

    @property
    def trainable_count(self) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(self.params))

    def model(self) -> GptOss:
        """The model with the current trained weights."""
        return self.train_fn.model(self.params)

    def train_step(self, batch: dict[str, np.ndarray], examples: int) -> dict[str, float]:
        """One optimizer step on `batch` ([micro-batches, rows, ...] arrays) that consumed `examples`."""
        learning_rate = float(self.train_fn.schedule(self.step))
        key = jax.random.fold_in(self.key, self.step)
        started = time.perf_counter()
        batch = self.place_batch(batch)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.train_fn.frozen, batch, key)
        metrics = {name: float(np.asarray(value)) for name, value in metrics.items()}
        seconds = time.perf_counter() - started
        self.step += 1
        self.examples_seen += examples
        return dict(metrics, step=self.step, learning_rate=learning_rate, seconds=seconds)

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """On a mesh, each batch array as one global array with its rows split over 'data' (every process
        holds the whole batch and hands its devices their rows)."""
        if self.mesh is None:
            return batch
        data = self.mesh.shape["data"]

        def place(name: str, value: np.ndarray) -> jax.Array:
            axis = self.row_axes.get(name, 1)
            if value.shape[axis] % data:
                raise ConfigError(
                    f"a micro-batch of {value.shape[axis]} rows does not split over mesh axis data={data}"
                )
            spec = jax.sharding.PartitionSpec(*([None] * axis), "data")
            sharding = jax.sharding.NamedSharding(self.mesh, spec)
            return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

        return {name: place(name, np.asarray(value)) for name, value in batch.items()}

    # Checkpoints.

    def _progress(self) -> dict:
        return {
            "step": self.step,
            "examples_seen": self.examples_seen,
            "rng_key": np.asarray(jax.random.key_data(self.key)).tolist(),
        }

    def save(self) -> None:
        """Checkpoint the trainable parameters, optimizer state, step, data position and RNG."""
        if self.step in self.manager.all_steps():
            return
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(self.params),
                opt_state=ocp.args.StandardSave(self.opt_state),
                progress=ocp.args.JsonSave(self._progress()),
            ),
        )
        self.manager.wait_until_finished()

    def restore_latest(self) -> bool:
        """Resume from the newest checkpoint in run_dir, if there is one."""
        step = self.manager.latest_step()
        if step is None:
            return False
        _check_fits(self.manager.item_metadata(step)["params"], self.params, f"{self.manager.directory}: checkpoint {step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(self.params)),
                opt_state=ocp.args.StandardRestore(_abstract(self.opt_state)),
                progress=ocp.args.JsonRestore(),
            ),
        )
        self.params, self.opt_state = restored.params, restored.opt_state
        progress = restored.progress
        self.step, self.examples_seen = progress["step"], progress["examples_seen"]
        self.key = jax.random.wrap_key_data(jnp.asarray(progress["rng_key"], jnp.uint32))
        return True


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_params(run_dir: str | Path, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
    """The trained parameters of a run (its latest checkpoint, or `step`), without the optimizer state."""
    directory = (Path(run_dir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise ConfigError(f"{run_dir}: no checkpoints/ folder (not a training run directory?)")
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options, item_handlers=checkpoint_handlers()) as manager:
        steps = manager.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = "any checkpoint" if step is None else f"a checkpoint of step {step} (has {sorted(steps)})"
            raise ConfigError(f"{directory}: no {wanted}")
        step = max(steps) if step is None else step
        _check_fits(manager.item_metadata(step)["params"], abstract_params, f"{directory}: checkpoint {step}")
        arguments = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params)))
        restored = manager.restore(step, args=arguments)
    return restored.params, step


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        ".".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _check_fits(saved_metadata: Any, abstract_params: dict, what: str) -> None:
    """Fail with one line naming the first parameter the saved ones lack or hold in another shape."""
    saved = _shapes(saved_metadata)
    for name, shape in _shapes(abstract_params).items():
        if name not in saved:
            raise ConfigError(f"{what} does not fit this model: it has no parameter {name}")
        if saved[name] != shape:
            raise ConfigError(
                f"{what} does not fit this model: parameter {name} is {list(saved[name])}, the model needs {list(shape)}"
            )


class MetricsLog:
    """metrics.jsonl in the run dir: one JSON object a step. On resume, lines past the restored step go.
    In a multi-process run only the first process writes it (every process computes the same metrics)."""

    def __init__(self, path: str | Path, resumed_step: int):
        self.path = Path(path)
        self.writes = jax.process_index() == 0
        if self.path.exists() and self.writes:
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)

    def write(self, metrics: dict) -> None:
        if not self.writes:
            return
        clean = {name: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for name, value in metrics.items()}  # fmt: skip
        with self.path.open("a") as file:
            file.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
