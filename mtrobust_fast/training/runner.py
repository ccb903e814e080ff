"""Assemble and run a clean training from a ``TrainConfig``: data, model, optimiser, objective, ``Trainer``.

Differences from the source's training (MTRobust ``mtask_train_loop``): training batches are shuffled every
epoch (seeded; the source used ``shuffle=False``); task losses are the registry's valid-pixel means; ``best.pt``
is really written (the source compared against 0 and never saved its best model); checkpoints are plain data
that rebuild the model (no DataParallel ``module.`` keys, no pickled modules).
"""
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from mtrobust_fast.data.taskonomy import TaskonomyDataset
from mtrobust_fast.models import build_model, read_checkpoint
from mtrobust_fast.training import distributed
from mtrobust_fast.training.config import RESUME_FIXED, parse_schedule
from mtrobust_fast.training.loop import LAST, Trainer, seed_everything
from mtrobust_fast.training.objectives import CleanObjective, WeightedTaskLoss

CONFIG_NAME = "config.json"


def make_optimizer(config, parameters):
    """Adam with torch defaults (the source's Taskonomy jobs), or SGD with momentum; weight decay per config."""
    if config.optim == "adam":
        return torch.optim.Adam(parameters, lr=parse_schedule(config.lr_schedule)[0][1], weight_decay=config.decay)
    return torch.optim.SGD(parameters, lr=parse_schedule(config.lr_schedule)[0][1], momentum=config.momentum,
                           weight_decay=config.decay)


def make_datasets(config):
    def split(name, limit):
        dataset = TaskonomyDataset(config.data, config.tasks, split=name, size=config.size, layout=config.layout,
                                   split_csv=config.split_csv, point_threshold=config.point_threshold)
        return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset

    return split("train", config.limit_train), split("val", config.limit_val)


def make_loaders(config, ctx, train_set, val_set):
    """Shuffled, sharded, full batches for training (as the source: drop_last); every sample once for validation."""
    if len(val_set) < ctx.world_size:
        raise ValueError(f"{len(val_set)} validation samples cannot be shared by {ctx.world_size} processes")
    common = dict(num_workers=config.workers, pin_memory=ctx.device.type == "cuda",
                  persistent_workers=config.workers > 0)
    train_sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                       seed=config.seed, drop_last=True)
    train_loader = DataLoader(train_set, config.batch_size, sampler=train_sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, config.val_batch_size or config.batch_size,
                            sampler=distributed.ShardSampler(len(val_set), ctx.rank, ctx.world_size), **common)
    return train_loader, val_loader


def check_resumable(config, meta, path):
    """The fixed settings of a resumed run must equal the checkpoint's; name every one that differs."""
    saved = meta.get("train_config", {})
    changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {getattr(config, key)!r} now"
               for key in RESUME_FIXED if saved.get(key) != getattr(config, key)]
    if changed:
        raise ValueError(f"cannot resume {path} with different settings: " + "; ".join(changed))


def train(config):
    """Run (or resume) the training ``config`` describes; returns the last epoch's metrics record."""
    ctx = distributed.init(config.device)
    try:
        return _train(config, ctx)
    finally:
        distributed.shutdown(ctx)


def _train(config, ctx):
    run_dir = Path(config.out)
    last = run_dir / LAST
    if last.exists() and not config.resume:
        raise FileExistsError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                              f"or choose another --out")
    seed_everything(config.seed)
    model = build_model(config.tasks, config.encoder, input_size=config.size, task_weights=config.task_weights())
    loss = WeightedTaskLoss(model.config["task_weights"])
    train_set, val_set = make_datasets(config)
    train_loader, val_loader = make_loaders(config, ctx, train_set, val_set)
    trainer = Trainer(
        model, CleanObjective(loss), make_optimizer(config, model.parameters()), parse_schedule(config.lr_schedule),
        train_loader, val_loader, loss, run_dir=run_dir, ctx=ctx, amp=config.amp, save_every=config.save_every,
        progress=config.progress, seed=config.seed, record=config.to_dict(),
    )
    start = 0
    if config.resume and last.exists():
        payload = read_checkpoint(last, map_location=ctx.device)
        check_resumable(config, payload["meta"], last)
        start = trainer.restore(payload)
        if ctx.is_main:
            print(f"resuming {last} after epoch {start}", flush=True)
    elif config.resume and ctx.is_main:
        print(f"no {LAST} in {run_dir}: starting a new run", flush=True)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if start >= config.epochs:
        if ctx.is_main:
            print(f"{run_dir} is already trained for {start} epochs (--epochs {config.epochs})", flush=True)
        return payload["meta"].get("metrics")
    return trainer.fit(config.epochs, start_epoch=start, val_before=config.val_before)
