"""``client.trainer: hf``: a round's local training run by ``transformers.Trainer`` instead of the built-in loop.

The Trainer gets ``TrainingArguments`` from the client section (batch size, steps or epochs, gradient
accumulation, clipping, the seeds derived from (seed, round, client)) and fedtune's optimizer and schedule
(``optimizers=``), so the learning rate keeps its federation-wide position (fedtune.client.schedule) and
the loss is the task's own (a thin module that returns ``task.loss(batch)``: the same token-weighted loss
as the built-in loop, for every task kind). What acts inside fedtune's loop (FedProx's term, SCAFFOLD's
correction, DP-SGD, stragglers, FLoRA's rank mask) cannot act inside the Trainer and is refused.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch

from fedtune.client.schedule import round_schedule
from fedtune.client.train import LocalHooks, LocalResult, LocalRun, make_optimizer, micro_batches_per_round
from fedtune.config.schema import ClientConfig
from fedtune.core.rng import derive_seed
from fedtune.errors import ConfigError
from fedtune.tasks.base import Example, Task


class TaskLoss(torch.nn.Module):
    """The task's model with the task's loss as its output: what Trainer.compute_loss reads."""

    accepts_loss_kwargs = False  # Trainer then averages over gradient-accumulation steps itself

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task
        self.model = task.module  # registered: the Trainer sees (and moves) the same parameters

    def forward(self, batch: object) -> dict[str, torch.Tensor]:
        loss, _ = self.task.loss(batch)  # type: ignore[arg-type]
        return {"loss": loss}

    def collate(self, examples: list[Example]) -> dict[str, object]:
        """The task's batch under one key (a batch may be a tuple; the Trainer passes a mapping as kwargs)."""
        return {"batch": self.task.collate(examples)}


def hf_local_train(
    task: Task, examples: Sequence[Example], cfg: ClientConfig, run: LocalRun, *, hooks: LocalHooks
) -> LocalResult:
    """One round of local training with ``transformers.Trainer`` (the built-in loop's arguments)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if hooks.loss_terms or hooks.grad_hooks:
        raise ConfigError(
            "client.trainer 'hf' runs transformers.Trainer's own loop: FedProx, SCAFFOLD, DP-SGD, stragglers and "
            "FLoRA's ranks act inside fedtune's built-in loop (client.trainer: builtin)"
        )
    if not examples:
        raise ValueError(f"client {run.client_id} has no training examples")
    batch_size = len(examples) if cfg.full_batch else cfg.batch_size
    steps = -(-micro_batches_per_round(cfg, len(examples), batch_size) // cfg.gradient_accumulation_steps)
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    schedule = round_schedule(cfg, steps_per_round=steps, round_idx=run.round_idx, rounds=run.rounds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    trainer_seed = derive_seed(run.seed, "shuffle", run.round_idx, run.client_id) % 2**31
    with tempfile.TemporaryDirectory(prefix="fedtune-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            max_grad_norm=cfg.max_grad_norm or 0.0,
            seed=trainer_seed,
            data_seed=trainer_seed,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_drop_last=False,
        )
        model = TaskLoss(task)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=list(examples),
            data_collator=model.collate,
            optimizers=(optimizer, scheduler),
        )
        trainer.remove_callback(PrinterCallback)  # fedtune reports the round; no per-client metrics dict on stdout
        output = trainer.train()
    task.module.eval()
    return LocalResult(
        num_examples=len(examples),
        steps=output.global_step,
        train_loss=float(output.training_loss),
        examples_per_s=float(output.metrics.get("train_samples_per_second", 0.0)),  # the Trainer's own figure
    )
