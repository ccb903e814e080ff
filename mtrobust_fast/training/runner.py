"""Assemble and run a training from a ``TrainConfig``: data, model, optimiser, objective, weighting, ``Trainer``.

The data folder decides the model: a Taskonomy root (real or synthetic) trains a multi-task model with one
decoder per task; an object set or a CIFAR binary folder trains a classifier (one "class" head, the 32-px
ResNet stem for small images, the training split's pixel statistics as the model's input normalisation).

Differences from the source's training (MTRobust ``mtask_train_loop``): training batches are shuffled every
epoch (seeded; the source used ``shuffle=False``); task losses are the registry's valid-pixel means; ``best.pt``
is really written (the source compared against 0 and never saved its best model); checkpoints are plain data
that rebuild the model (no DataParallel ``module.`` keys, no pickled modules).
"""
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from mtrobust_fast import task_names
from mtrobust_fast.tasks import auxiliary
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.data import readers
from mtrobust_fast.evaluation import baselines
from mtrobust_fast.files import FolderLock, atomic_write, writable_folder
from mtrobust_fast.data.classification import is_classification_data, open_classification
from mtrobust_fast.data.benchmarks import find_layout, open_benchmark
from mtrobust_fast.data.taskonomy import TaskonomyDataset
from mtrobust_fast.models import STRIDE, build_classifier, build_dense_model, build_model, read_checkpoint
from mtrobust_fast.training import distributed
from mtrobust_fast.training.adversarial import OBJECTIVES, RobustValidation, make_objective
from mtrobust_fast.training.augment import Augment
from mtrobust_fast.training.averaging import WeightAverage
from mtrobust_fast.training.awp import AWP
from mtrobust_fast.training.gradalign import GradAlign
from mtrobust_fast.training.config import DEFAULT_TASKS, RESUME_FIXED, TrainConfig
from mtrobust_fast.training.schedules import Schedule, parse_schedule
from mtrobust_fast.training.loop import BEST, LAST, LOG_NAME, Trainer, keep_weights_only, seed_everything
from mtrobust_fast.training.gat import GAT
from mtrobust_fast.training.objectives import CleanObjective, TaskLosses
from mtrobust_fast.training.regularisers import CurvatureRegularised
from mtrobust_fast.tasks.benchmarks import SegmentationTask
from mtrobust_fast.weighting import make_weighting

CONFIG_NAME = "config.json"
TRIVIAL_NAME = "trivial.json"  # the validation scores of the tasks' trivial predictors


def native_size(dataset):
    """The side of the dataset's first image, which must be a multiple of the encoders' stride."""
    if len(dataset) == 0:
        raise ValueError("data: the training split is empty")
    side = int(dataset[0][0].shape[-1])
    if side % STRIDE:
        raise ValueError(f"size: the images are {side} px, not a multiple of {STRIDE}; give --size (e.g. "
                         f"{max(STRIDE, side // STRIDE * STRIDE)})")
    return side


def make_optimizer(config, parameters):
    """Adam with torch defaults (the source's Taskonomy jobs), or SGD with momentum; weight decay per config."""
    if config.optim == "adam":
        return torch.optim.Adam(parameters, lr=parse_schedule(config.lr_schedule)[0][1], weight_decay=config.decay)
    return torch.optim.SGD(parameters, lr=parse_schedule(config.lr_schedule)[0][1], momentum=config.momentum,
                           weight_decay=config.decay)


def _limited(dataset, limit):
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset


def _refuse_classifier_options(config, what):
    if config.aux_names:
        raise ValueError(f"aux: auxiliary self-supervised tasks train classifiers (classification data); "
                         f"{what}'s other tasks are its auxiliary tasks")
    if config.domain_labels:
        raise ValueError("domain_labels: domain heads are for classification data")
    if config.findings:
        raise ValueError(f"findings: {config.data} is not a chest X-ray set")
    if config.class_loss != "ce":
        raise ValueError(f"class_loss: {config.data} is dense multi-task data, whose model has no classification "
                         f"head (the loss of its segmentation task is segment_loss)")


def _benchmark_datasets(config):
    """(train set, val set, model) for a NYUv2 / Cityscapes root: a dense model with the benchmark's heads."""
    _refuse_classifier_options(config, "a NYUv2 or Cityscapes model")
    train_set = open_benchmark(config.data, config.tasks, "train", config.size)
    val_set = open_benchmark(config.data, config.tasks, "val", config.size)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"data: {config.data} has no {'training' if not len(train_set) else 'validation'} images")
    if config.segment_loss != "ce" and "segment_semantic" not in [r.name for r in train_set.records]:
        raise ValueError("segment_loss: the task set has no segmentation (s)")
    names = [r.name for r in train_set.records]
    height, width = train_set[0][0].shape[1:]
    try:
        model = build_dense_model(train_set.records, config.encoder, input_size=int(height),
                                  task_weights=config.task_weights(names))
    except ValueError as error:
        if "input_size" not in str(error):
            raise
        raise ValueError(f"size: the images are {height}x{width} px; {error}; give --size (the height; the width "
                         f"follows in proportion)") from None
    if width % model.config["input_stride"]:
        raise ValueError(f"size: the images are {height}x{width} px, a width that is not a multiple of the "
                         f"{config.encoder} encoder's stride {model.config['input_stride']}; give --size")
    return train_set, val_set, model


def make_datasets(config):
    """(train set, val set, model) for the config's data: a dense model with the benchmark's heads on NYUv2 /
    Cityscapes, a classifier on classification data, else a multi-task Taskonomy model."""
    if find_layout(config.data) is not None:
        train_set, val_set, model = _benchmark_datasets(config)
    elif is_classification_data(config.data):
        if config.tasks is not None:
            raise ValueError(f"tasks: {config.data} is a classification dataset; its model has one 'class' head "
                             f"(leave --tasks out)")
        if config.segment_loss != "ce":
            raise ValueError(f"segment_loss: {config.data} is a classification dataset; it has no segmentation task")
        depth = any(auxiliary.AUXILIARY[kind].from_data for kind in config.aux_names)  # depth maps from the data
        if any(s.name == "findings" for s in readers.find(config.data).settings) and config.class_loss != "ce":
            raise ValueError("class_loss: a chest X-ray head is multi-label (a sigmoid BCE per finding); leave "
                             "--class-loss at ce")
        findings = [f.strip() for f in config.findings.split(",") if f.strip()] if config.findings else None
        train_set = open_classification(config.data, "train", config.size, config.domain_labels, depth, findings)
        val_set = open_classification(config.data, "val", config.size, config.domain_labels, findings=findings)
        if len(train_set) == 0 or len(val_set) == 0:
            raise ValueError(f"data: {config.data} has no {'training' if not len(train_set) else 'validation'} images")
        size = config.size or int(train_set[0][0].shape[-1])
        aux = [auxiliary.for_run(kind, config.seed, config.to_dict()) for kind in config.aux_names]
        model = build_classifier(config.encoder, train_set.classes, size, config.class_loss, train_set.normalization,
                                 aux=aux, domain_classes=train_set.domain_classes if config.domain_labels else None,
                                 head=getattr(train_set, "main_task", None),
                                 domain_tasks=getattr(train_set, "domain_tasks", ()),
                                 input_channels=getattr(train_set, "input_channels", 3))
        model.config["task_weights"] = config.task_weights(model.task_names)
    else:
        _refuse_classifier_options(config, "a Taskonomy model")
        tasks = config.tasks or DEFAULT_TASKS

        def split(name, size):
            return TaskonomyDataset(config.data, tasks, split=name, size=size, layout=config.layout,
                                    split_csv=config.split_csv, point_threshold=config.point_threshold)

        size = config.size or native_size(split("train", None))
        train_set, val_set = split("train", size), split("val", size)
        names = [t.name for t in task_registry.resolve(tasks)]
        if config.segment_loss != "ce" and "s" not in task_registry.task_string(tasks):
            raise ValueError(f"segment_loss: the task set {task_registry.task_string(tasks)} has no segmentation (s)")
        model = build_model(tasks, config.encoder, input_size=size, task_weights=config.task_weights(names))
    if config.data_subset is not None:  # limited-data training: the first fraction of the training images
        train_set = _limited(train_set, max(1, math.ceil(config.data_subset * len(train_set))))
    return _limited(train_set, config.limit_train), _limited(val_set, config.limit_val), model


def training_record(record, segment_loss):
    """The record a head trains with: segmentation heads with the ``segment_loss`` chosen (attacks, errors and
    metrics keep the model's own record, plain cross-entropy)."""
    if isinstance(record, task_registry.Task):
        return task_registry.training_record(record.name, segment_loss)
    return record.with_loss(segment_loss) if isinstance(record, SegmentationTask) else record


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


def _model_tasks(spec, names, what):
    """:func:`~mtrobust_fast.task_names.model_tasks`, its errors worded like the training config's own."""
    try:
        return task_names.model_tasks(spec, names, what)
    except ValueError as error:
        raise ValueError(str(error)) from None


def attacked_tasks(config, model):
    """The task names ``attack_tasks`` names: "all" (every labelled task), "main" (``main``, or the model's only
    labelled task), or task letters/names separated by commas ("s,d", "sd")."""
    names = model.evaluated_task_names
    text = config.attack_tasks.strip()
    if text == "all":
        return list(names)
    if text == "main":
        if config.main is None and len(names) > 1 and "class" not in names:
            raise ValueError(f"attack_tasks: 'main' needs --main when the model has several tasks ({names})")
        if config.main is None:
            return ["class" if "class" in names else names[0]]
        return _model_tasks(config.main, names, "main")
    return _model_tasks(text, names, "attack_tasks")


def make_objective_for(config, model, losses):
    """(training objective, attacked task names) for the labelled tasks' ``losses``, wrapped in GAT when the
    model has auxiliary heads; the names are None when nothing is attacked, neither in training nor in robust
    validation."""
    attacked = None if config.adversarial == "none" and config.robust_images == 0 else attacked_tasks(config, model)
    if config.adversarial == "none":
        objective = CleanObjective(losses)
    else:
        settings = config.attack_settings(autocast=config.amp_dtype)
        declared = OBJECTIVES[config.adversarial].settings
        objective = make_objective(config.adversarial, losses, settings, attacked,
                                   **{s.name: getattr(config, s.name) for s in declared})
    if config.gradalign:  # GradAlign's term on the attacked tasks (inside AWP and GAT)
        objective = GradAlign(objective, losses, attacked)
    if config.awp_gamma:  # the main objective trained at perturbed weights (inside GAT, which adds the heads)
        objective = AWP(objective, model.config["task_weights"], config.awp_gamma, config.awp_warmup)
    auxiliary_tasks = [model.task_records[name] for name in model.config.get("auxiliary", [])]
    if auxiliary_tasks:
        objective = GAT(objective, auxiliary_tasks, config.aux_routing)
    return objective, attacked


def curvature_tasks(config, model):
    """The two tasks whose input gradients the curvature term compares: ``curvature_tasks`` ("s,d"), else the
    main task (``main`` or the first) and the first other task."""
    names = model.task_names
    if config.curvature_tasks:
        chosen = [part.strip() for part in config.curvature_tasks.split(",") if part.strip()]
        chosen = [_model_tasks(c, names, "curvature_tasks")[0] for c in chosen]
    else:
        main = names[0] if config.main is None else _model_tasks(config.main, names, "main")[0]
        chosen = [main] + [n for n in names if n != main][:1]
    if len(chosen) != 2:
        raise ValueError(f"curvature: needs two tasks (a main and an auxiliary one); the model has {names}")
    return chosen


def robust_validation(config, ctx, val_set, losses, attacked):
    if config.robust_images == 0:
        return None
    subset = _limited(val_set, config.robust_images)
    if len(subset) < ctx.world_size:
        raise ValueError(f"robust_val: {len(subset)} images cannot be shared by {ctx.world_size} processes")
    loader = DataLoader(subset, config.val_batch_size or config.batch_size,
                        sampler=distributed.ShardSampler(len(subset), ctx.rank, ctx.world_size),
                        num_workers=config.workers)
    return RobustValidation(loader, config.attack_settings(validation=True), losses.tasks, attacked, config.seed)


def check_resumable(config, meta, path):
    """The fixed settings of a resumed run must equal the checkpoint's; name every one that differs."""
    saved = meta.get("train_config", {})
    defaults = {key: field.default for key, field in TrainConfig.__dataclass_fields__.items()}
    saved = {key: saved.get(key, defaults[key]) for key in RESUME_FIXED}  # settings added since keep defaults
    changed = [f"{key}: {saved[key]!r} in the checkpoint, {getattr(config, key)!r} now"
               for key in RESUME_FIXED if saved[key] != getattr(config, key)]
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
    """Checks the run folder before any work (writable, not another run's unless resuming) and holds it locked
    while training, so two runs on one folder cannot interleave their logs and checkpoints."""
    if not str(config.out).strip():
        raise ValueError("out: an empty path would write into the current folder; name the run folder")
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out: {run_dir} is a file; --out names the run folder (checkpoints and logs go inside)")
    if (run_dir / LAST).exists() and not config.resume:
        raise FileExistsError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                              f"or choose another --out")
    if ctx.is_main:
        writable_folder(run_dir, "out")
    with FolderLock(run_dir, "out") if ctx.is_main else nullcontext():
        return _run(config, ctx, run_dir)


def _run(config, ctx, run_dir):
    last = run_dir / LAST
    seed_everything(config.seed)
    train_set, val_set, model = make_datasets(config)
    records = {name: training_record(record, config.segment_loss) for name, record in model.task_records.items()}
    losses = TaskLosses([records[name] for name in model.evaluated_task_names],  # trained on labels; validated
                        label_smoothing=config.label_smoothing)
    objective, attacked = make_objective_for(config, model, losses)
    train_loader, val_loader = make_loaders(config, ctx, train_set, val_set)
    weights = dict(model.config["task_weights"])
    if config.gradalign:
        if ctx.distributed:
            raise ValueError("gradalign: its double backward does not go through DDP; train it in one process")
        weights["gradalign"] = config.gradalign
    if config.curvature != "none":
        if ctx.distributed:
            raise ValueError("curvature: the regulariser's double backward does not go through DDP; train it in "
                             "one process")
        objective = CurvatureRegularised(objective, TaskLosses(records.values()), *curvature_tasks(config, model),
                                         config.curvature)
        weights["curvature"] = config.curvature_weight
    if config.awp_gamma and ctx.distributed:
        raise ValueError("awp_gamma: the weight perturbation is computed without DDP's gradient averaging; train it "
                         "in one process")
    if config.weighting != "static" and ctx.distributed:
        raise ValueError(f"weighting: {config.weighting} aggregates each process's own task gradients, which DDP "
                         f"cannot average correctly; use --weighting static under torchrun")
    schedule = Schedule(parse_schedule(config.lr_schedule), config.epochs, len(train_loader), config.schedule_kind,
                        config.warmup_epochs, config.eps_warmup_epochs)
    model.to(ctx.device)
    trainer = Trainer(
        model, objective, make_weighting(config.weighting, weights),
        make_optimizer(config, model.parameters()),
        schedule, train_loader, val_loader, losses, run_dir=run_dir, ctx=ctx,
        amp=config.amp_dtype, channels_last=config.channels_last, save_every=config.save_every,
        progress=config.progress, seed=config.seed,
        record={**config.to_dict(), "objective_settings": objective.describe()},
        robust=robust_validation(config, ctx, val_set, losses, attacked) if attacked else None,
        select=config.select, augment=Augment(config.augment, {t.name: t for t in losses.tasks}),
        average=None if config.ema is None else WeightAverage(model, config.ema, config.ema_warmup),
    )
    start = 0
    if config.resume and last.exists():
        payload = read_checkpoint(last, map_location=ctx.device)
        check_resumable(config, payload["meta"], last)
        done = payload["meta"].get("epoch")
        if isinstance(done, int) and done >= config.epochs:  # finished: no training state is needed
            if ctx.is_main:
                print(f"{run_dir} is already trained for {done} epochs (--epochs {config.epochs})", flush=True)
            return payload["meta"].get("metrics")
        start = trainer.restore(payload)
        if ctx.is_main:
            print(f"resuming {last} after epoch {start}", flush=True)
    elif config.resume and ctx.is_main:
        print(f"no {LAST} in {run_dir}: starting a new run", flush=True)
    trivial = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        trivial = trivial_predictors(config, run_dir, losses.tasks, train_set, val_set, ctx.device)
    record = trainer.fit(config.epochs, start_epoch=start, val_before=config.val_before)
    if ctx.is_main and config.keep == "weights":
        keep_weights_only(last)
    if ctx.is_main:
        print(closing_summary(record, trivial, {t.name: t for t in losses.tasks}, run_dir), flush=True)
    return record


def trivial_predictors(config, run_dir, records, train_set, val_set, device):
    """The validation scores of each task's trivial predictor (see :mod:`mtrobust_fast.evaluation.baselines`),
    from ``TRIVIAL_NAME`` in the run folder when an earlier start of the run computed them; printed."""
    path = run_dir / TRIVIAL_NAME
    if path.exists():
        scores = json.loads(path.read_text())
    else:
        generator = torch.Generator().manual_seed(config.seed)
        batch = config.val_batch_size or config.batch_size
        train_loader = DataLoader(train_set, config.batch_size, shuffle=True, generator=generator,
                                  num_workers=config.workers)
        scores = baselines.trivial_scores(records, train_loader, DataLoader(val_set, batch, num_workers=config.workers),
                                          device)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(scores, indent=1) + "\n"))
    print("trivial predictors on the validation set (what a model must beat): " + " | ".join(
        f"{name} {values['predictor']} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()
                                                    if k != "predictor" and not k.startswith("auc_"))
        for name, values in scores.items()), flush=True)
    return scores


WORSENED = 1.1  # a task whose validation loss ends this many times above where the log started got worse


def _worsened(log):
    """Warnings for tasks whose validation loss rose over the run (first logged epoch → last), which a final
    table of metrics alone does not show (an auxiliary head can be trained into the ground by the others)."""
    try:
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    if len(entries) < 2:
        return []
    first, last = entries[0]["val"]["tasks"], entries[-1]["val"]["tasks"]
    return [f"  warning: {name} got worse during training: validation loss {first[name]['loss']:.4g} at epoch "
            f"{entries[0]['epoch']} -> {last[name]['loss']:.4g} at epoch {entries[-1]['epoch']}"
            for name in last if name in first and first[name].get("loss") is not None
            and last[name].get("loss") is not None and last[name]["loss"] > WORSENED * first[name]["loss"]]


def closing_summary(record, trivial, records, run_dir):
    """What the run produced: the last epoch's validation metrics against the trivial predictors, and where the
    checkpoints are."""
    lines = [f"finished epoch {record['epoch']}; validation against the trivial predictor of each task:"]
    for name, scores in record["val"]["tasks"].items():
        base = (trivial or {}).get(name)
        text = baselines.compare(scores, base, records[name].higher_is_better) if base else \
            " ".join(f"{k} {v:.4g}" for k, v in scores.items() if not k.startswith("auc_"))
        lines.append(f"  {name}: {text}" + (f" [{base['predictor']}]" if base else ""))
    lines += _worsened(run_dir / LOG_NAME)
    saved = [p.name for p in (run_dir / LAST, run_dir / BEST) if p.exists()]
    lines.append(f"checkpoints in {run_dir}: {', '.join(saved) or 'none'}; log {run_dir / LOG_NAME}")
    return "\n".join(lines)
