"""Supervised fine-tuning on harmony conversations, with LoRA over packed MXFP4 experts or full fine-tuning.

    python -m train.sft --config configs/sft-tiny.yaml                 # a tiny random model, minutes on CPU
    python -m train.sft --config configs/sft-20b.yaml lora.rank=16 steps=500

The loss is the mean negative log-likelihood of the assistant's tokens (everything after each assistant
message's `<|start|>assistant` header). A run directory holds config.yaml (the resolved config),
metrics.jsonl (a line a step) and checkpoints/ (orbax; a rerun resumes from the latest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
from flax import nnx
from tqdm import tqdm

from gptoss_jax.chat import harmony
from gptoss_jax.cli import join_distributed, run_command
from gptoss_jax.training import sft_loss
from train.config import SFTConfig, check_resumable, read_config, run_arguments, write_run_config
from train.data import example_order, load_dataset, make_batch
from train.loop import MetricsLog, Trainer, setting_up
from train.model import base_checkpoint, build_model


def train(config: SFTConfig, progress: bool = True, stop_after: int | None = None) -> Trainer:
    """Run (or resume) the fine-tuning described by `config`; returns the trainer at its last step.

    stop_after: leave after this step, checkpointed, as a preempted run would (a later call resumes).
    """
    run_dir = Path(config.run_dir)
    check_resumable(config)
    with setting_up(run_dir):  # a failure before the first step leaves no new run_dir behind
        checkpoint = base_checkpoint(config)
        encoding = harmony.load_encoding(checkpoint)
        dataset = load_dataset(config.data, encoding, config.max_length, config.reasoning_effort)
        model = build_model(config, checkpoint, rows={"batch_size": config.batch_size})
        trainer = Trainer(
            model,
            nnx.Param if config.lora is None else nnx.LoRAParam,
            config.optimizer,
            config.steps,
            run_dir,
            loss_fn=sft_loss,
            seed=config.seed,
            keep=config.keep,
            use_dropout=config.lora is not None and config.lora.dropout > 0,
        )
        resumed = trainer.restore_latest()
    primary = jax.process_index() == 0  # every process computes; the first one reports
    progress = progress and primary
    for warning in dataset.warnings(config.data, config.max_length) if primary else ():
        print(f"warning: {warning}", file=sys.stderr)
    if progress:
        what = f"resuming at step {trainer.step}" if resumed else "starting"
        print(f"{config.run_dir}: {what}; training {trainer.trainable_count:,} parameters", file=sys.stderr)
    write_run_config(config)
    log = MetricsLog(run_dir / "metrics.jsonl", trainer.step)

    per_step = config.batch_size * config.grad_accum
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not progress, desc="sft", unit="step")
    last_step = config.steps if stop_after is None else min(stop_after, config.steps)
    while trainer.step < last_step:
        order = example_order(len(dataset.examples), config.seed, trainer.examples_seen, per_step)
        batch = make_batch([dataset.examples[i] for i in order], config.batch_size, config.max_length)
        metrics = trainer.train_step(batch, per_step)
        metrics["tokens_per_second"] = metrics["tokens"] / metrics["seconds"]
        log.write(metrics)
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}"
        )
        if trainer.step % config.save_every == 0 or trainer.step == last_step:
            trainer.save()
    bar.close()
    return trainer


def run(args: argparse.Namespace, scratch: Path) -> int:
    config = read_config(SFTConfig, args.config, args.overrides)
    join_distributed(args)
    trainer = train(config, progress=not args.no_progress, stop_after=args.stop_after)
    last = MetricsLog(Path(config.run_dir) / "metrics.jsonl", trainer.step).read()[-1:]
    if last:
        print(f"step {trainer.step}: loss {last[0]['loss']:.4f}; run in {config.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, run_arguments(argv, "python -m train.sft", __doc__, "lora.rank=16"))


if __name__ == "__main__":
    sys.exit(main())
