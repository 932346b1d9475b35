"""The one training loop, shared by teachers and students.

SGD with momentum and weight decay, linear warm-up then cosine (per step, or per epoch as the
official DKL script), the objective from pipeline.train.losses, validation every epoch (and the test
split too when asked), a checkpoint every epoch (model, optimizer, scheduler, epoch, params,
dataset fingerprint, the GI prior of the previous epoch) and resume from it after a crash, a
progress bar, and per-epoch metrics and plots through dvclive. On CUDA: bf16 autocast unless
`precision: fp32`, channels_last, pinned memory and non-blocking copies; on CPU it runs as is.
"""

from __future__ import annotations

import math
import time
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

from pipeline.stream.augment import normalize
from pipeline.stream.device_decode import batch_pixels
from pipeline.train.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from pipeline.distributed import Distributed, distributed
from pipeline.train.evaluate import predict, top_k_accuracy
from pipeline.train.losses import DistillationObjective
from pipeline.train.priors import PreviousEpochPrior
from pipeline.locks import exclusive_writer
from pipeline.params import TrainParams

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
    # GI weights from the previous epoch's teacher outputs (student.ikl.prior: previous_epoch)
    class_prior: PreviousEpochPrior | None = None
    test_batches: Callable[[], Iterable[dict]] | None = None  # set: log test/top1 per epoch
    description: str = "train"


def fit(model: nn.Module, run: TrainRun, out_dir: str | Path, live_dir: str | Path) -> dict:
    """Train `model` per `run` (`_fit`), or with `epochs: 0` take its weights as they are
    (`_keep_weights`), holding out_dir's lock (on rank 0, the only writer): a second training
    run into the same folder is refused at once instead of interleaving checkpoints."""
    is_main = distributed().is_main
    with exclusive_writer(out_dir, "training run") if is_main else nullcontext():
        if run.settings.epochs == 0:
            return _keep_weights(model, run, out_dir, live_dir)
        return _fit(model, run, out_dir, live_dir)


def _setup(model: nn.Module, run: TrainRun, out_dir: str | Path):
    """The model on this rank's device, its optimizer and schedule, and the epoch to start
    from with the last metrics (after a matching checkpoint's epoch, else 0 and none)."""
    ranks = distributed()
    cuda = ranks.device.type == "cuda"
    model = model.to(ranks.device,
                     memory_format=torch.channels_last if cuda else torch.preserve_format)
    settings = run.settings
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(settings, step, run.steps_per_epoch))
    checkpoint_path = Path(out_dir) / CHECKPOINT
    start_epoch, metrics = _resume(checkpoint_path, run, model, optimizer, scheduler)
    return model, optimizer, scheduler, checkpoint_path, start_epoch, metrics


def _live(live_dir: str | Path, resume: bool):
    """dvclive's logger on rank 0, nothing elsewhere."""
    if not distributed().is_main:
        return nullcontext()
    return Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _keep_weights(model: nn.Module, run: TrainRun, out_dir: str | Path,
                  live_dir: str | Path) -> dict:
    """`epochs: 0`: the weights used as they are, validated, then checkpointed with epoch -1
    (none trained) so that dump and evaluate read them like a trained model's. A matching
    checkpoint is kept as it is: the later stages need not rerun."""
    ranks = distributed()
    model, optimizer, scheduler, checkpoint_path, _, metrics = _setup(model, run, out_dir)
    with _live(live_dir, resume=False) as live:
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


def _fit(model: nn.Module, run: TrainRun, out_dir: str | Path, live_dir: str | Path) -> dict:
    """Train `model` per `run`, checkpointing to out_dir/checkpoint.pt; returns the last
    epoch's metrics. Rerun after a crash, it resumes from the checkpoint when the checkpoint's
    identity (params, fingerprint) equals `run.identity`. Under torchrun it trains with DDP:
    metrics are reduced over ranks, rank 0 writes the checkpoint and the dvclive output."""
    ranks = distributed()
    settings = run.settings
    model, optimizer, scheduler, checkpoint_path, start_epoch, metrics = _setup(
        model, run, out_dir)
    trained = model if ranks.world_size == 1 else DistributedDataParallel(model)
    with _live(live_dir, resume=start_epoch > 0) as live:
        if live:
            # The dvclive step is the epoch. Its own resume reads the last logged step and
            # adds 1, except after step 0, which it cannot tell from an empty log: a resume
            # after the first epoch would log epoch 2 as step 0 again. The checkpoint knows.
            live.step = start_epoch
        for epoch in range(start_epoch, settings.epochs):
            progress = tqdm(total=run.steps_per_epoch, disable=not ranks.is_main,
                            desc=f"{run.description}: epoch {epoch + 1}/{settings.epochs}")
            wall, cpu = time.perf_counter(), time.process_time()  # this process, all threads
            sums, last_lr = _train_epoch(trained, run, epoch, optimizer, scheduler, ranks,
                                         progress)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if run.class_prior is not None:  # all ranks' crops of this epoch -> the next prior
                run.class_prior.end_epoch(ranks.all_reduce_)
            totals = dict(zip(sums, ranks.sum(list(sums.values()))))
            samples = totals.pop("samples")
            metrics = {f"train/{name}": total / samples for name, total in totals.items()}
            metrics["train/lr"] = last_lr  # the rate of the epoch's last step
            metrics.update(validate(model, run.val_batches(), ranks, settings.precision))
            if run.test_batches is not None:  # the official protocol's number, for comparison
                test = validate(model, run.test_batches(), ranks, settings.precision)
                metrics["test/top1"] = test["val/top1"]
            _report_epoch(progress, run, epoch, metrics, ranks)
            if live:
                for name, value in metrics.items():
                    live.log_metric(name, value)
                # The epoch's training time on this rank (validation excluded), for the
                # results table's cost column; logged only, so the returned metrics and the
                # checkpoint stay the same bits run after run.
                live.log_metric("time/epoch_wall_s", wall)
                live.log_metric("time/epoch_cpu_s", cpu)
                live.next_step()
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, metrics,
                                 {**run.identity, **_prior_state(run)})
            ranks.barrier()  # no rank starts the next epoch before the checkpoint exists
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
                 ranks: Distributed, progress: tqdm) -> tuple[dict[str, float], float]:
    """One epoch on this rank; returns sample-weighted sums of each loss term + `samples`, and
    the learning rate of the epoch's last step. `progress` advances per step and shows the
    epoch's running mean loss."""
    cuda = ranks.device.type == "cuda"
    autocast = _autocast(ranks.device, run.settings.precision)
    last_lr = optimizer.param_groups[0]["lr"]
    model.train()
    sums = defaultdict(float)
    for step, batch in enumerate(run.train_batches(epoch)):
        if "images" in batch:  # the CPU decode path: the workers cut the views
            images = batch["images"].to(ranks.device, non_blocking=True)
        else:  # the device decode path: encoded images, decoded and cut here
            images = batch_pixels(batch, ranks.device, run.settings.image_size)
        images = normalize(images)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["labels"].to(ranks.device, non_blocking=True)
        teacher_logits, class_weights = (
            run.teacher_targets(batch, images) if run.teacher_targets else (None, None))
        if run.class_prior is not None:  # (B, C) rows of the previous epoch's prior
            class_weights = run.class_prior.weights(labels)
            run.class_prior.observe(teacher_logits, labels)
        with autocast:
            student_logits = model(images)  # (B, C)
        losses = run.objective(student_logits.float(), labels, teacher_logits, class_weights)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        last_lr = optimizer.param_groups[0]["lr"]
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
    return {name: float(total) for name, total in sums.items()}, last_lr


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA for `precision: bf16`; fp32 (no autocast) otherwise."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def validate(model: nn.Module, batches: Iterable[dict], ranks: Distributed,
             precision: str = "bf16") -> dict:
    """Top-1/top-5 (%) over this rank's share of the batches, summed over ranks. Runs the
    plain module (not DDP), so ranks with different batch counts never wait on each other."""
    logits, labels = predict(model, batches, ranks.device, precision=precision)
    correct = [0.0, 0.0]
    if len(labels):  # a rank may hold no validation shard
        correct = [top_k_accuracy(logits, labels, k) * len(labels) / 100
                   for k in (1, min(5, logits.shape[1]))]
    top1, top5, count = ranks.sum([*correct, len(labels)])
    return {"val/top1": 100.0 * top1 / count, "val/top5": 100.0 * top5 / count}


def lr_factor(settings: TrainParams, step: int, steps_per_epoch: int) -> float:
    """The LR multiplier at optimizer step `step` (0-based) under `settings.schedule`."""
    if settings.schedule == "per_epoch":
        return epoch_lr_factor(step // steps_per_epoch, settings.warmup_epochs, settings.epochs)
    return _warmup_cosine(step, settings.warmup_epochs * steps_per_epoch,
                          settings.epochs * steps_per_epoch)


def epoch_lr_factor(epoch: int, warmup_epochs: int, epochs: int) -> float:
    """The official DKL `adjust_learning_rate`, set once per epoch (0-based):

        if epoch < args.warmup_epochs: lr = lr / args.warmup_epochs * (epoch + 1)
        elif args.cos: lr *= 0.5 * (1. + math.cos(math.pi * (epoch - args.warmup_epochs + 1)
                                                  / (args.epochs - args.warmup_epochs + 1)))

    For 90 epochs and 10 warm-up: 0.1 .. 1.0 over epochs 0..9, then 0.5 * (1 + cos(pi *
    (e - 9) / 81)), which starts just below 1 at epoch 10 and never reaches 0."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs + 1) / (epochs - warmup_epochs + 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear from 1/warmup to 1 over warm-up, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, metrics: dict,
                     identity: dict):
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch,
                           "metrics": metrics, **identity})


def _prior_state(run: TrainRun) -> dict:
    """What a checkpoint keeps of the GI prior: the one the next epoch uses."""
    return {} if run.class_prior is None else {"class_prior": run.class_prior.state_dict()}


def _resume(path: Path, run: TrainRun, model, optimizer, scheduler) -> tuple[int, dict]:
    """The epoch to start from and the last metrics: after the checkpoint's epoch, or 0
    without a matching checkpoint."""
    if not path.is_file():
        return 0, {}
    state = load_checkpoint(path)
    if any(state.get(key) != value for key, value in run.identity.items()):
        return 0, {}  # params or data changed since: train from scratch
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if run.class_prior is not None:
        run.class_prior.load_state_dict(state["class_prior"])
    if state["epoch"] >= 0:  # -1: weights used as they are (epochs 0), nothing to resume
        print(f"resuming {path} after epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["metrics"]
