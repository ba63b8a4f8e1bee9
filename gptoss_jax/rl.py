"""Policy-gradient losses of the GRPO family, as pure functions of per-token log-probabilities, and the
training-step loss built on them (train.grpo trains with it; eval.bench plans its step).

Shapes: R rows (completions), T tokens. `mask` marks completion tokens (1) against prompt and padding
(0). `old` are the log-probabilities the rollout sampled with, `ref` the reference model's (for the KL
term), `advantages` one per row. Every loss returns a sum and the weight it is to be divided by, so
that gradient accumulation over micro-batches gives the same result as one big batch:

- grpo:    mean over rows of (mean over the row's tokens of the clipped surrogate); advantages are
           group-normalised (reward - group mean) / (group std + 1e-4).
- dr_grpo: as grpo, but each row's token sum is divided by one constant (the longest completion
           allowed) and advantages are not divided by the std (Dr. GRPO).
- dapo:    token-level: the sum over every completion token of the batch divided by their count.
- gspo:    sequence-level ratio: exp(mean over the row's tokens of new - old), clipped per row (GSPO).

The clipped surrogate is min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A). The KL to the
reference uses the k3 estimator exp(ref - new) - (ref - new) - 1, weighted by beta and normalised like
the surrogate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.errors import ConfigError
from gptoss_jax.nn import GptOss

LOSSES = ("grpo", "dr_grpo", "dapo", "gspo")


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    loss: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    max_completion_length: int = 256  # dr_grpo's constant normaliser

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def scales_rewards(self) -> bool:
        """Whether advantages are divided by the group's reward std (all but Dr. GRPO)."""
        return self.loss != "dr_grpo"


def group_advantages(rewards: np.ndarray, scale: bool) -> np.ndarray:
    """[groups, G] rewards -> advantages: centred in each group, divided by its std (ddof 1) if `scale`."""
    rewards = np.asarray(rewards, np.float64)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if not scale:
        return centred.astype(np.float32)
    std = rewards.std(axis=1, ddof=1, keepdims=True) if rewards.shape[1] > 1 else np.zeros_like(centred)
    return (centred / (std + 1e-4)).astype(np.float32)


def policy_objective(
    settings: PolicyLoss,
    new: jax.Array,
    old: jax.Array,
    ref: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed loss to minimise, sums of metrics incl. "weight", the loss's divisor)."""
    mask = mask.astype(jnp.float32)
    lengths = mask.sum(axis=1)
    rows = (lengths > 0).astype(jnp.float32)
    advantage = advantages[:, None]
    low, high = 1.0 - settings.epsilon_low, 1.0 + settings.epsilon_high
    log_ratio = (new - old) * mask
    if settings.loss == "gspo":
        ratio = jnp.exp(log_ratio.sum(axis=1) / jnp.maximum(lengths, 1.0))[:, None]  # one per row
    else:
        ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, low, high) * advantage)
    kl = jnp.zeros_like(new) if ref is None else jnp.exp(ref - new) - (ref - new) - 1.0
    if settings.loss == "gspo":
        per_row = -surrogate[:, 0] * rows + settings.beta * (kl * mask).sum(axis=1) / jnp.maximum(lengths, 1.0)
        objective, weight = per_row.sum(), rows.sum()
        clipped_low = ((ratio[:, 0] < low) & (advantages < 0)) * rows
        clipped_high = ((ratio[:, 0] > high) & (advantages > 0)) * rows
        clip_counts = (clipped_low.sum(), clipped_high.sum(), rows.sum())
    else:
        per_token = (-surrogate + settings.beta * kl) * mask
        if settings.loss == "grpo":
            objective, weight = (per_token.sum(axis=1) / jnp.maximum(lengths, 1.0)).sum(), rows.sum()
        elif settings.loss == "dr_grpo":
            objective, weight = per_token.sum() / settings.max_completion_length, rows.sum()
        else:  # dapo
            objective, weight = per_token.sum(), mask.sum()
        clipped_low = ((ratio < low) & (advantage < 0)) * mask
        clipped_high = ((ratio > high) & (advantage > 0)) * mask
        clip_counts = (clipped_low.sum(), clipped_high.sum(), mask.sum())
    gap = jnp.abs(new - old) * mask
    metrics = {
        "weight": weight,
        "tokens": mask.sum(),
        "kl": (kl * mask).sum(),
        "clipped_low": clip_counts[0],
        "clipped_high": clip_counts[1],
        "clip_count": clip_counts[2],
        "logprob_gap": gap.sum(),
        "logprob_gap_max": gap.max(),
    }
    return objective, metrics


def completion_hidden(model: GptOss, batch: dict, dropout_key=None) -> jax.Array:
    """Hidden states [R, W, D] of each row's completion window (the forward runs over the whole row, with
    the rollout's experts if the batch has them; only the window is unembedded)."""
    hidden, _, _ = model.forward(batch["inputs"], batch["positions"], dropout_key=dropout_key,
                                 routes=batch.get("routes"))  # fmt: skip
    window = batch["window_start"][:, None] + jnp.arange(batch["targets"].shape[1])[None, :]
    window = jnp.minimum(window, hidden.shape[1] - 1)
    return jnp.take_along_axis(hidden, window[:, :, None], axis=1)


def rl_loss(settings: PolicyLoss):
    """The TrainStep loss: the policy objective on the batch's completion windows."""

    def loss(model: GptOss, batch: dict, dropout_key) -> tuple[jax.Array, dict[str, jax.Array]]:
        new, entropy = model.token_logprobs_and_entropy(completion_hidden(model, batch, dropout_key), batch["targets"])
        objective, metrics = policy_objective(
            settings, new, batch["old_logprobs"], batch.get("ref_logprobs"), batch["advantages"], batch["mask"]
        )
        metrics["entropy"] = (entropy * batch["mask"]).sum()
        return objective, metrics

    return loss
