"""The one training loop, shared by teachers and students.

SGD with momentum and weight decay, linear warm-up then cosine (per step), the objective from
pipeline.losses, validation every epoch, a checkpoint every epoch (model, optimizer,
scheduler, epoch, params, dataset fingerprint) and resume from it after a crash, a progress
bar, and per-epoch metrics and plots through dvclive. On CUDA: bf16 autocast, channels_last,
pinned memory and non-blocking copies; on CPU it runs as is.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from dvclive import Live
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.augment import normalize
from pipeline.distributed import Distributed, distributed
from pipeline.evaluate import predict, top_k_accuracy
from pipeline.losses import DistillationObjective
from pipeline.params import TrainParams

CHECKPOINT = "checkpoint.pt"
PROGRESS_EVERY = 20  # steps between progress-bar loss updates on a GPU (each one syncs it)

# (batch, images on the device, normalised) -> (teacher logits (B, C) or None,
#                                              class weights (B, C) or None)
TeacherTargets = Callable[[dict, torch.Tensor], tuple]


@dataclass(frozen=True)
class TrainRun:
    """Everything the loop needs besides the model."""

    settings: TrainParams
    objective: DistillationObjective
    train_batches: Callable[[int], Iterable[dict]]  # epoch -> that epoch's batches
    val_batches: Callable[[], Iterable[dict]]
    steps_per_epoch: int
    identity: dict  # params + dataset fingerprint: a checkpoint resumes only if they match
    teacher_targets: TeacherTargets | None = None
    description: str = "train"


def fit(model: nn.Module, run: TrainRun, out_dir: str | Path, live_dir: str | Path) -> dict:
    """Train `model` per `run`, checkpointing to out_dir/checkpoint.pt; returns the last
    epoch's metrics. Rerun after a crash, it resumes from the checkpoint when the checkpoint's
    identity (params, fingerprint) equals `run.identity`. Under torchrun it trains with DDP:
    metrics are reduced over ranks, rank 0 writes the checkpoint and the dvclive output."""
    ranks = distributed()
    cuda = ranks.device.type == "cuda"
    model = model.to(ranks.device,
                     memory_format=torch.channels_last if cuda else torch.preserve_format)
    settings = run.settings
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    total_steps = settings.epochs * run.steps_per_epoch
    warmup_steps = settings.warmup_epochs * run.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, warmup_steps, total_steps))
    checkpoint_path = Path(out_dir) / CHECKPOINT
    start_epoch, metrics = _resume(checkpoint_path, run.identity, model, optimizer, scheduler)
    trained = model if ranks.world_size == 1 else DistributedDataParallel(model)
    logger = (Live(str(live_dir), resume=start_epoch > 0, save_dvc_exp=False, dvcyaml=None)
              if ranks.is_main else nullcontext())
    with logger as live:
        if live:
            # The dvclive step is the epoch. Its own resume reads the last logged step and
            # adds 1, except after step 0, which it cannot tell from an empty log: a resume
            # after the first epoch would log epoch 2 as step 0 again. The checkpoint knows.
            live.step = start_epoch
        for epoch in range(start_epoch, settings.epochs):
            progress = tqdm(total=run.steps_per_epoch, disable=not ranks.is_main,
                            desc=f"{run.description}: epoch {epoch + 1}/{settings.epochs}")
            sums = _train_epoch(trained, run, epoch, optimizer, scheduler, ranks, progress)
            totals = dict(zip(sums, ranks.sum(list(sums.values()))))
            samples = totals.pop("samples")
            metrics = {f"train/{name}": total / samples for name, total in totals.items()}
            metrics["train/lr"] = optimizer.param_groups[0]["lr"]
            metrics.update(validate(model, run.val_batches(), ranks))
            _report_epoch(progress, run, epoch, metrics, ranks)
            if live:
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, metrics,
                                 run.identity)
            ranks.barrier()  # no rank starts the next epoch before the checkpoint exists
        if settings.epochs == 0:  # weights used as they are: validated, then checkpointed with
            # epoch -1 (none trained) so that dump and evaluate read them like a trained model.
            # A matching checkpoint is kept as it is: the later stages need not rerun.
            if not metrics:
                metrics = validate(model, run.val_batches(), ranks)
                if live:
                    _save_checkpoint(checkpoint_path, model, optimizer, scheduler, -1, metrics,
                                     run.identity)
            if ranks.is_main:
                print(f"{run.description}: weights used as they are (epochs 0): val top-1 "
                      f"{metrics['val/top1']:.2f}%", flush=True)
            if live:
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
            ranks.barrier()
    return metrics


def _report_epoch(progress: tqdm, run: TrainRun, epoch: int, metrics: dict,
                  ranks: Distributed) -> None:
    """The epoch's mean loss and validation top-1 in its bar, then one log line."""
    progress.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                         val_top1=f"{metrics['val/top1']:.2f}")
    progress.close()
    if ranks.is_main:
        print(f"{run.description}: epoch {epoch + 1}/{run.settings.epochs} train loss "
              f"{metrics['train/loss']:.4f}, val top-1 {metrics['val/top1']:.2f}%, top-5 "
              f"{metrics['val/top5']:.2f}%", flush=True)


def _train_epoch(model: nn.Module, run: TrainRun, epoch: int, optimizer, scheduler,
                 ranks: Distributed, progress: tqdm) -> dict[str, float]:
    """One epoch on this rank; returns sample-weighted sums of each loss term + `samples`.
    `progress` advances per step and shows the epoch's running mean loss."""
    cuda = ranks.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    model.train()
    sums = defaultdict(float)
    for step, batch in enumerate(run.train_batches(epoch)):
        images = normalize(batch["images"].to(ranks.device, non_blocking=True))
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["labels"].to(ranks.device, non_blocking=True)
        teacher_logits, class_weights = (
            run.teacher_targets(batch, images) if run.teacher_targets else (None, None))
        with autocast:
            student_logits = model(images)  # (B, C)
        losses = run.objective(student_logits.float(), labels, teacher_logits, class_weights)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        scheduler.step()
        # Summed on the device: .item() every step would stall the GPU on each batch.
        for name, value in losses.items():
            sums[name] = sums[name] + value.detach() * len(labels)
        sums["samples"] += len(labels)
        if not cuda or step % PROGRESS_EVERY == 0:  # running mean of the epoch so far
            progress.set_postfix(loss=f"{float(sums['loss']) / sums['samples']:.3f}",
                                 refresh=False)
        progress.update()
    return {name: float(total) for name, total in sums.items()}


def validate(model: nn.Module, batches: Iterable[dict], ranks: Distributed) -> dict:
    """Top-1/top-5 (%) over this rank's share of the batches, summed over ranks. Runs the
    plain module (not DDP), so ranks with different batch counts never wait on each other."""
    logits, labels = predict(model, batches, ranks.device)
    correct = [0.0, 0.0]
    if len(labels):  # a rank may hold no validation shard
        correct = [top_k_accuracy(logits, labels, k) * len(labels) / 100
                   for k in (1, min(5, logits.shape[1]))]
    top1, top5, count = ranks.sum([*correct, len(labels)])
    return {"val/top1": 100.0 * top1 / count, "val/top5": 100.0 * top5 / count}


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear from 1/warmup to 1 over warm-up, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, metrics: dict,
                     identity: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "metrics": metrics,
             **identity}
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-save never leaves a torn checkpoint


def _resume(path: Path, identity: dict, model, optimizer, scheduler) -> tuple[int, dict]:
    """The epoch to start from and the last metrics: after the checkpoint's epoch, or 0
    without a matching checkpoint."""
    if not path.is_file():
        return 0, {}
    state = load_checkpoint(path)
    if any(state.get(key) != value for key, value in identity.items()):
        return 0, {}  # params or data changed since: train from scratch
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["epoch"] >= 0:  # -1: weights used as they are (epochs 0), nothing to resume
        print(f"resuming {path} after epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["metrics"]


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fit`, loaded safely (tensors and plain data only)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the model first "
                                "(dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)
