"""The LoRA adapter module and the projection it rides on (gptoss_jax/lora.py attaches adapters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.nn.ops import dropout, init, matmul
from gptoss_jax.runtime import Runtime


class LoRA(nnx.Module):
    """A trainable low-rank update riding on a frozen projection: out += scale * b(a(dropout(x))).

    Dense projections: a [rank, *in], b [*out, rank]. Experts: a [E, rank, in], b [E, out, rank] (one
    adapter per expert). `b` starts at zero, so an adapted model starts exactly equal to its base.
    """

    def __init__(
        self,
        a_shape: tuple[int, ...],
        a_axes: tuple[str, ...],
        b_shape: tuple[int, ...],
        b_axes: tuple[str, ...],
        *,
        fan_in: int,
        scale: float,
        dropout: float,
        rngs: nnx.Rngs,
    ):
        self.a = nnx.LoRAParam(init(rngs, a_shape, jnp.float32, fan_in**-0.5), axes=a_axes)
        self.b = nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32), axes=b_axes)
        self.scale = scale
        self.dropout = dropout

    def dense(self, equation: str, x: jax.Array, dtype, key: jax.Array | None, runtime: Runtime) -> jax.Array:
        """The update for a dense projection written as `equation` (x, weight)."""
        inputs, output = equation.split("->")
        lhs, rhs = inputs.split(",")
        into = "".join(label for label in rhs if label in lhs)
        out = "".join(label for label in rhs if label not in lhs)
        rows = "".join(label for label in output if label not in rhs)
        low = matmul(f"{lhs},R{into}->{rows}R", dropout(x, self.dropout, key), self.a[...], dtype, runtime)
        return self.scale * matmul(f"{rows}R,{out}R->{output}", low, self.b[...], dtype, runtime)


def project(
    equation: str, x: jax.Array, weight, dtype, lora: LoRA | None, key: jax.Array | None, runtime: Runtime
) -> jax.Array:
    """A dense projection plus its adapter's update, if it has one."""
    out = matmul(equation, x, weight, dtype, runtime)
    return out if lora is None else out + lora.dense(equation, x, dtype, key, runtime)
