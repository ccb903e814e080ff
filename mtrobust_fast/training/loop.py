"""The epoch loop: schedule, objective step (AMP, DDP), validation metrics, checkpoints, JSON-lines log.

The per-batch objective is pluggable (see ``objectives``), so adversarial training and GAT reuse this loop.
"""
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mtrobust_fast import evaluation
from mtrobust_fast.device import to_device
from mtrobust_fast.files import atomic_write, remove_stale_temporaries, write_failure
from mtrobust_fast.models import read_checkpoint, save_checkpoint
from mtrobust_fast.training import distributed
from mtrobust_fast.training.config import SELECT
from mtrobust_fast.training.schedules import Schedule

LOG_NAME = "metrics.jsonl"
LAST, BEST = "last.pt", "best.pt"
TRAINING_STATE = ("optimizer", "scaler", "best_score", "raw_state_dict", "ema_updates")  # what only resuming needs
COLLAPSE_RISE = 0.2  # a jump of the adversarial validation error between epochs that triggers the warning


def keep_weights_only(path):
    """Rewrite the checkpoint at ``path`` without what only resuming needs (optimiser and scaler states, the raw
    weights of an averaged run): a finished run's ``last.pt`` then costs what its weights cost."""
    payload = read_checkpoint(path)
    if any(key in payload["meta"] for key in TRAINING_STATE):
        meta = {k: v for k, v in payload["meta"].items() if k not in TRAINING_STATE}
        atomic_write(path, lambda tmp: torch.save({**payload, "meta": meta}, tmp))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """A well-mixed seed for (run seed, epoch, process): re-seeding every epoch makes a resumed run draw the
    same random numbers as an uninterrupted one, without storing per-process generator states."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _plain(value):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_line(record):
    """One human-readable line per epoch: train loss, then each task's validation metrics (per-label AUCs of a
    multi-label head stay in the log only)."""
    parts = [f"epoch {record['epoch']}"]
    if "train" in record:
        parts.append(f"lr {record['train']['lr']:.2g} train loss {record['train']['loss']:.4f}")
    val = record["val"]
    parts.append(f"val loss {val['loss']:.4f}")
    for name, scores in val["tasks"].items():
        parts.append(name + " " + " ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.startswith("auc_")))
    if "robust_val" in record:
        robust = record["robust_val"]
        parts.append(f"adv ({robust['attack']} on {'+'.join(robust['attacked'])}) " + " ".join(
            f"{name} loss {v['adv_loss']:.4f} error {v['adv_error']:.4f}" for name, v in robust["tasks"].items()))
    return " | ".join(parts)


class Trainer:
    """Trains ``model`` with ``objective`` and ``weighting`` on ``train_loader``; validates every task of ``losses``
    (a :class:`~mtrobust_fast.training.objectives.TaskLosses`) with its metrics.

    ``schedule``: a :class:`~mtrobust_fast.training.schedules.Schedule` (or a parsed step schedule, see
    ``schedules.parse_schedule``). ``average``: an optional
    :class:`~mtrobust_fast.training.averaging.WeightAverage`, updated after every optimiser step; it is then the
    model that is validated, selected and saved (the raw weights travel in ``last.pt`` for resuming). ``robust``: optional
    :class:`RobustValidation`, run after the clean validation every epoch. ``select``: "clean" keeps as
    ``best.pt`` the epoch with the lowest weighted clean validation loss, "robust" the one with the lowest
    weighted adversarial validation error. Checkpoints (rank 0 only) go to ``run_dir``: ``last.pt`` every epoch,
    ``best.pt``, and ``epoch_NNNN.pt`` every ``save_every`` epochs; their ``meta`` holds the epoch, optimiser and
    scaler states, the best score so far and ``record`` (the run's configuration). ``amp``: None, torch.float16
    (CUDA, with loss scaling) or torch.bfloat16 (any device): the objective (its inner attack included) and the
    clean validation run under autocast to it. ``channels_last``: the model (and its average) and every batch are
    kept in channels-last memory order, which oneDNN and cuDNN convolutions run faster.
    """

    def __init__(self, model, objective, weighting, optimizer, schedule, train_loader, val_loader, losses, *,
                 run_dir, ctx=distributed.DistContext(), amp=None, channels_last=False, save_every=0, progress=True,
                 seed=0, record=None, robust=None, select="clean", augment=None, average=None):
        amp = torch.float16 if amp is True else amp or None
        if amp not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp must be None, torch.float16 or torch.bfloat16, got {amp!r}")
        if amp == torch.float16 and ctx.device.type != "cuda":
            raise ValueError("amp: float16 mixed precision (with loss scaling) needs CUDA; use torch.bfloat16 on CPU")
        if len(train_loader) == 0:
            raise ValueError("the training loader yields no batch: the (per-process) training set is smaller "
                             "than one batch; lower the batch size or add data")
        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        if select == "robust" and robust is None:
            raise ValueError("select='robust' needs robust validation (a robust validation subset)")
        self.ctx = ctx
        self.channels_last = bool(channels_last)
        self.module = model.to(ctx.device, memory_format=self._layout)
        if average is not None:
            average.model.to(memory_format=self._layout)
        self.model = DistributedDataParallel(
            self.module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        ) if ctx.distributed else self.module
        self.objective, self.weighting, self.optimizer = objective, weighting, optimizer
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule, 1, len(train_loader))
        self.average = average  # a WeightAverage: the model that is validated, selected and saved
        self.losses = losses
        self.train_loader, self.val_loader = train_loader, val_loader
        self.robust, self.select = robust, select
        self.augment = augment  # an augment.Augment for the training batches (None: none)
        self.run_dir = Path(run_dir)
        self.amp, self.save_every, self.seed = amp, save_every, seed
        self.progress = progress and ctx.is_main
        self.record = dict(record or {})
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == torch.float16)  # bf16 needs no scaling
        self.best_score = math.inf
        self._last_robust_error = None
        self.task_names = losses.names
        self.train_terms = list(getattr(weighting, "weights", None) or losses.names)  # tasks + extra terms

    # ---- one epoch ----

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=self.amp, enabled=self.amp is not None)

    @property
    def _layout(self):
        return torch.channels_last if self.channels_last else torch.preserve_format

    def _batch(self, batch):
        """A loader's batch on the training device, in the training memory layout."""
        images, targets, masks = to_device(batch, self.ctx.device)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets, masks

    def _updates(self, images, targets, masks):
        """The objective's outputs for one batch, each computed under autocast."""
        updates = self.objective.updates(self.model, images, targets, masks)
        while True:
            with self._autocast():
                out = next(updates, None)
            if out is None:
                return
            yield out

    @property
    def evaluated(self):
        """The model validation scores and checkpoints hold: the weight average when there is one."""
        return self.average.model if self.average is not None else self.module

    def _set_rates(self, epoch, step):
        lr = self.schedule.lr(epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.objective.scale_budget(self.schedule.eps_factor(epoch, step))
        return lr

    def train_epoch(self, epoch, epochs):
        first_lr = lr = self._set_rates(epoch, 0)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.objective.start_epoch(epoch)
        self.model.train()
        # Running sums on the device (no per-step host sync): combined loss, per-term losses, sample count.
        sums = torch.zeros(len(self.train_terms) + 2, dtype=torch.float64, device=self.ctx.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not self.progress)
        for step, batch in enumerate(bar):
            if step:
                lr = self._set_rates(epoch, step)
            images, targets, masks = self._batch(batch)
            if self.augment:
                images, targets, masks = self.augment(images, targets, masks)
            n = images.shape[0]
            for out in self._updates(images, targets, masks):
                self.optimizer.zero_grad(set_to_none=True)
                extra = dict(model=self.module, features=out.features) if self.weighting.needs_model else {}
                total = self.weighting.backward(out.task_losses, scaler=self.scaler, **extra)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.objective.after_step()
                if self.average is not None:
                    self.average.update(self.module)
                values = [total] + [out.task_losses[name].detach() for name in self.train_terms]
                sums[:-1] += torch.stack(values).double() * n
                sums[-1] += n
            if self.progress and (step % 10 == 0 or step == len(self.train_loader) - 1):  # every 10th and the last
                bar.set_postfix(loss=f"{total.item():.4f}")
        distributed.all_reduce_sum(self.ctx, sums)
        means = (sums[:-1] / sums[-1]).tolist()
        if not math.isfinite(means[0]):
            raise FloatingPointError(f"training loss became {means[0]} in epoch {epoch + 1}; lower the learning rate")
        return {"lr": first_lr, "lr_last": lr, "loss": means[0], "samples": int(sums[-1]),
                "task_losses": dict(zip(self.train_terms, means[1:]))}

    @torch.no_grad()
    def validate(self):
        """Per-task validation loss and clean metrics of :attr:`evaluated`, pooled over every validation pixel of
        every process."""
        model = self.evaluated
        model.eval()
        loss_sums = torch.zeros(len(self.task_names) + 1, dtype=torch.float64, device=self.ctx.device)
        stats = {}
        for batch in tqdm(self.val_loader, desc="val", leave=False, disable=not self.progress):
            images, targets, masks = self._batch(batch)
            with self._autocast():
                outputs = model(images)
            per_sample = self.losses.per_sample(outputs, targets, masks)
            loss_sums[:-1] += torch.stack([per_sample[name].double().sum() for name in self.task_names])
            loss_sums[-1] += images.shape[0]
            for task in self.losses.tasks:
                batch_stats = task.metric_stats(outputs[task.name], targets[task.name], masks.get(task.name))
                stats[task.name] = batch_stats if task.name not in stats else stats[task.name] + batch_stats
        if len(stats) != len(self.task_names):
            raise ValueError("the validation loader yielded no batch on this process; it needs at least one "
                             "validation sample per process")
        distributed.all_reduce_sum(self.ctx, loss_sums)
        task_means = dict(zip(self.task_names, (loss_sums[:-1] / loss_sums[-1]).tolist()))
        tasks = {}
        for task in self.losses.tasks:
            scores = task.metric_scores(distributed.all_reduce_sum(self.ctx, stats[task.name]).cpu())
            tasks[task.name] = {"loss": task_means[task.name], **scores}
        return {"loss": self.validated_mean(task_means), "samples": int(loss_sums[-1]), "tasks": tasks}

    def validated_mean(self, values):
        """The validated tasks' numbers combined with their training weights renormalised to sum to 1 over them:
        a model trained with terms that are not validated (GAT's auxiliary heads, the curvature term) reports its
        main task's loss and error as they are, not shrunk by the other terms' share of the weights (which also
        kept the catastrophic-overfitting warning from firing)."""
        weights = getattr(self.weighting, "weights", None)
        total = sum(weights[name] for name in values) if weights else 0
        return float(self.weighting.combine(values)) / (total if total > 0 else 1)

    def validate_robust(self):
        """Adversarial loss and error of every task of :attr:`evaluated` on the robust validation subset (the
        attack of ``self.robust``; per-process shards summed over processes)."""
        summary = evaluation.evaluate(self.evaluated, self.robust.loader, self.robust.make_attack(self.evaluated),
                                      self.losses.tasks, gradients=False, device=self.ctx.device)
        (attacked,) = summary["attacks"].values()
        n = summary["samples"]
        keys = ("adv_loss", "adv_error")
        sums = torch.tensor([[attacked["tasks"][name][k] * n for k in keys] + [summary["clean"][name]["error"] * n]
                             for name in self.task_names] + [[n, 0.0, 0.0]], dtype=torch.float64,
                            device=self.ctx.device)
        distributed.all_reduce_sum(self.ctx, sums)
        count = float(sums[-1, 0])
        tasks = {name: {"adv_loss": float(sums[i, 0]) / count, "adv_error": float(sums[i, 1]) / count,
                        "clean_error": float(sums[i, 2]) / count} for i, name in enumerate(self.task_names)}
        return {"attack": self.robust.describe(), "attacked": attacked["attacked"], "samples": int(count),
                "loss": self.validated_mean({k: v["adv_loss"] for k, v in tasks.items()}),
                "error": self.validated_mean({k: v["adv_error"] for k, v in tasks.items()}),
                "tasks": tasks}

    # ---- checkpoints and log ----

    def save(self, name, epoch, metrics, training_state=True):
        """A checkpoint of the evaluated model (the weight average, if any: ``meta["weights"]`` says which) with
        its metrics; ``training_state`` adds what resuming needs (optimiser and scaler states, the best score,
        and with averaging the raw weights and the number of averaged updates), which ``best.pt`` leaves out."""
        state = dict(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                     best_score=self.best_score) if training_state else {}
        if training_state and self.average is not None:
            state.update(raw_state_dict=self.module.state_dict(), ema_updates=self.average.updates)
        save_checkpoint(self.run_dir / name, self.evaluated, epoch=epoch, select=self.select, train_config=self.record,
                        metrics=_plain(metrics), weights="ema" if self.average is not None else "raw", **state)

    def restore(self, payload):
        """Continue from a checkpoint payload (``models.read_checkpoint``): weights, optimiser, scaler, best score.

        Returns the number of epochs already done. RNG streams need no restoring: every epoch re-seeds from
        (seed, epoch, rank), and the shuffling order is a function of (seed, epoch).
        """
        meta = payload["meta"]
        if "optimizer" not in meta or "epoch" not in meta:
            raise ValueError("checkpoint holds no training state (optimizer, epoch); it cannot be resumed")
        if (self.average is not None) != (meta.get("weights") == "ema"):
            raise ValueError("the checkpoint's weight averaging (meta 'weights') does not match this run's ema setting")
        try:
            if self.average is not None:
                self.module.load_state_dict(meta["raw_state_dict"])
                self.average.load(payload["state_dict"], meta["ema_updates"])
            else:
                self.module.load_state_dict(payload["state_dict"])
            self.optimizer.load_state_dict(meta["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0:3]
            raise ValueError(f"the checkpoint does not fit this run's model or optimiser: {' '.join(first)}") from None
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.best_score = meta.get("best_score", math.inf)
        epoch = int(meta["epoch"])
        if self.ctx.is_main:
            self._trim_log(epoch)
        return epoch

    def _trim_log(self, epoch):
        """Drop the log lines of epochs after ``epoch``: a run killed after logging an epoch but before its
        ``last.pt`` landed redoes that epoch, and logs it again."""
        path = self.run_dir / LOG_NAME
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["epoch"] <= epoch:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        if len(kept) != len(lines):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))

    def log(self, record):
        """Append the epoch's record to ``metrics.jsonl`` (flushed to disk) and print its summary line."""
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:  # a line cut short by a full disk is dropped on --resume, like one cut by a kill
                with open(self.run_dir / LOG_NAME, "a") as f:
                    f.write(json.dumps(_plain(record)) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as error:
                raise write_failure(self.run_dir / LOG_NAME, error) from error
            tqdm.write(summary_line(record))

    def _warn_if_collapsed(self, record):
        """Catastrophic overfitting (typical of single-step adversarial training): the adversarial validation
        error jumps while the clean one does not. Warn when it rose by more than ``COLLAPSE_RISE`` since the
        previous epoch."""
        error = record["robust_val"]["error"]
        previous, self._last_robust_error = self._last_robust_error, error
        if previous is not None and error - previous > COLLAPSE_RISE and self.ctx.is_main:
            message = (f"warning: epoch {record['epoch']}: the adversarial validation error rose from {previous:.3f} "
                       f"to {error:.3f}; this looks like catastrophic overfitting (common with fgsm_rs: lower "
                       f"alpha, or train with madry/PGD)")
            record["warning"] = message
            tqdm.write(message)

    # ---- the run ----

    def fit(self, epochs, start_epoch=0, val_before=False):
        """Train epochs ``start_epoch`` … ``epochs - 1``; returns the last epoch's record.

        An epoch's outputs land in this order: its log line, ``best.pt`` (if it improved), ``epoch_NNNN.pt``, and
        ``last.pt`` last. A kill at any point leaves ``last.pt`` at the previous epoch, and the resumed run redoes
        the epoch exactly (dropping the log line it had already written), so no output is lost or doubled; a run
        that starts from epoch 0 starts its log afresh (lines left by a run killed before its first ``last.pt``
        would otherwise appear twice). Temporaries of killed writes are removed when a run starts."""
        if self.ctx.is_main and self.run_dir.is_dir():
            remove_stale_temporaries(self.run_dir)
            if start_epoch == 0:
                self._trim_log(-1)
        record = None
        if val_before and start_epoch == 0:
            record = {"epoch": 0, "val": self.validate()}
            if self.robust is not None:
                record["robust_val"] = self.validate_robust()
            self.log(record)
        for epoch in range(start_epoch, epochs):
            seed_everything(epoch_seed(self.seed, epoch, self.ctx.rank))
            started = time.perf_counter()
            train = self.train_epoch(epoch, epochs)
            val = self.validate()
            record = {"epoch": epoch + 1, "train": train, "val": val}
            if self.robust is not None:
                record["robust_val"] = self.validate_robust()
                self._warn_if_collapsed(record)
            record["seconds"] = time.perf_counter() - started
            score = record["robust_val"]["error"] if self.select == "robust" else val["loss"]
            improved = score < self.best_score
            self.best_score = min(self.best_score, score)
            self.log(record)
            if self.ctx.is_main:
                if improved:
                    self.save(BEST, epoch + 1, record, training_state=False)
                if self.save_every and (epoch + 1) % self.save_every == 0:
                    self.save(f"epoch_{epoch + 1:04d}.pt", epoch + 1, record)
                self.save(LAST, epoch + 1, record)
        distributed.barrier(self.ctx)
        return record
