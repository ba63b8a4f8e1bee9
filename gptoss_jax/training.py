"""One training step as a pure function: the trainable/frozen split, AdamW with warmup and cosine decay,
gradient accumulation over micro-batches, and the supervised loss. train/ runs it (data, checkpoints,
metrics); eval.bench compiles it on abstract shapes to plan memory.

Trainable parameters are kept as a plain dict of float32 arrays (what optax and orbax handle best) and
put back into the model inside the step; frozen ones (packed MXFP4 experts included) are passed to the
step as arguments, never baked into the program as constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptoss_jax.nn import GptOss
from gptoss_jax.sharding import state_shardings


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to `end_learning_rate`, after global-norm clipping."""

    learning_rate: float = 1e-4
    end_learning_rate: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon: gradients much smaller than it move their weights less
    grad_clip: float = 1.0


# loss_fn(model, micro_batch, dropout_key) -> (objective summed over the micro-batch, sums of metrics).
# metrics must hold "weight": what the summed objective is divided by (e.g. the count of learned tokens).
# Metrics are added over micro-batches, except those named "*_max", which keep the largest.
LossFn = Callable[[GptOss, dict, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(config: OptimizerConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(steps, config.warmup_steps + 1),
        end_value=config.end_learning_rate,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay),
    )
    return optimizer, schedule


class TrainStep:
    """The pure training step for the parameters of `model` that match `trainable` (nnx.LoRAParam for
    adapters, nnx.Param for every weight): jit it, or lower it on abstract shapes to plan memory.

    `model` may be abstract (nnx.eval_shape): the step only keeps its structure and the frozen state.
    """

    def __init__(self, model: GptOss, trainable: Any, optimizer: OptimizerConfig, steps: int, loss_fn: LossFn,
                 use_dropout: bool = False):  # fmt: skip
        self.graphdef, state, self.frozen = nnx.split(model, trainable, ...)
        # Trained parameters are float32 whatever the model's dtype; the template is only their structure.
        self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state)
        self.initial_params = nnx.to_pure_dict(jax.tree.map(_as_float32, state))
        self.optimizer, self.schedule = make_optimizer(optimizer, steps)
        self.loss_fn, self.use_dropout = loss_fn, use_dropout
        self.mesh = model.mesh
        if self.mesh is not None:  # a sharded run: where each part of its state lives (FSDP, see sharding.py)
            self.param_shardings = nnx.to_pure_dict(state_shardings(state, self.mesh, "trained"))
            self.frozen_shardings = state_shardings(self.frozen, self.mesh, "frozen")

    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def opt_state_shardings(self, opt_state: Any) -> Any:
        """Each optimizer-state leaf placed like the parameter it follows (Adam's moments mirror the
        parameters' tree inside the state's), anything else (step counts) replicated."""
        by_path = dict(jax.tree_util.tree_flatten_with_path(self.param_shardings)[0])

        def place(path, leaf):
            for start in range(len(path)):
                sharding = by_path.get(tuple(path[start:]))
                if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                    return sharding
            return self.replicated()

        return jax.tree_util.tree_map_with_path(place, opt_state)

    def model(self, params: dict, frozen: Any = None) -> GptOss:
        """The model with `params` in place of the trainable weights."""
        state = jax.tree.map(lambda x: x, self.template)  # a fresh State to fill
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.frozen if frozen is None else frozen)

    def __call__(self, params, opt_state, frozen, batch, key):
        """Gradients summed over the micro-batches (leading axis), divided by the summed weight, one update."""

        def micro(params, micro_batch, micro_key):
            model = self.model(params, frozen)
            return self.loss_fn(model, micro_batch, micro_key if self.use_dropout else None)

        grad_fn = jax.value_and_grad(micro, has_aux=True)

        def accumulate(carry, scanned):
            grads, objective, metrics = carry
            micro_batch, index = scanned
            (value, sums), micro_grads = grad_fn(params, micro_batch, jax.random.fold_in(key, index))
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            metrics = {name: _combine(name, metrics[name], sums[name]) for name in metrics}
            return (grads, objective + value, metrics), None

        count = jax.tree.leaves(batch)[0].shape[0]
        first_batch = jax.tree.map(lambda x: x[0], batch)
        metric_shapes = jax.eval_shape(lambda: micro(params, first_batch, key)[1])
        zeros = (
            jax.tree.map(jnp.zeros_like, params),
            jnp.zeros((), jnp.float32),
            {name: jnp.zeros(shape.shape, shape.dtype) for name, shape in metric_shapes.items()},
        )
        (grads, objective, metrics), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(count)))
        weight = jnp.maximum(metrics["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        metrics = dict(metrics, loss=objective / weight, grad_norm=optax.tree.norm(grads))
        return optax.apply_updates(params, updates), opt_state, metrics


def _combine(name: str, total: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.maximum(total, value) if name.endswith("_max") else total + value


def _as_float32(x):
    return jax.ShapeDtypeStruct(x.shape, jnp.float32) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(jnp.float32)


def sft_loss(model: GptOss, batch: dict, dropout_key) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed negative log-likelihood of the learned tokens, their count, and the count of all tokens."""
    hidden, _ = model.hidden(batch["inputs"], batch["positions"], dropout_key=dropout_key)
    logprobs = model.token_logprobs(hidden, batch["targets"])
    weights = batch["weights"]
    return -(logprobs * weights).sum(), {"weight": weights.sum(), "tokens": (batch["positions"] >= 0).sum()}
