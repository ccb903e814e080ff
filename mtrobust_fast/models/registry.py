"""Encoders registered by name, and ``build_model`` which assembles a multi-task model from a task string."""
import torch.nn as nn

import mtrobust_fast
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.models import encoders
from mtrobust_fast.tasks import classification
from mtrobust_fast.models.decoders import ClassificationHead, DenseHead, TaskonomyDecoder
from mtrobust_fast.models.multitask import STRIDE, MultiTaskModel

# Names the source's CLI used (``--arch``) for the same encoders.
_ALIASES = {"wresnet50": "wide_resnet50_2", "xception": "xception_small"}


def register_encoder(name):
    """Decorator: make an encoder constructor (``**kw -> nn.Module`` with ``out_channels``) buildable by name."""
    return encoders.ENCODERS.register(name)


def list_encoders():
    return sorted(encoders.ENCODERS)


def canonical_encoder_name(name):
    """The registered name for ``name`` (accepting the source's aliases); ValueError listing the choices."""
    name = _ALIASES.get(name, name)
    if name not in encoders.ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}")
    return name


def build_encoder(name, **kw):
    return encoders.ENCODERS[canonical_encoder_name(name)](**kw)


def _weights_by_name(resolved, task_weights):
    """Task weights keyed by task name; ``None`` → uniform 1/N (the source's unweighted models)."""
    if task_weights is None:
        return task_registry.task_weights(resolved)
    by_key = {}
    for t in resolved:
        for key in (t.name, t.letter):
            if key in task_weights:
                by_key[t.name] = float(task_weights[key])
    known = {t.name for t in resolved} | {t.letter for t in resolved}
    stray = [k for k in task_weights if k not in known]
    missing = [t.name for t in resolved if t.name not in by_key]
    if stray or missing:
        raise ValueError(
            f"task_weights must give one weight per model task ({', '.join(t.name for t in resolved)}); "
            f"missing {missing}, not in the model {stray}"
        )
    return by_key


def build_model(tasks="sdnE", encoder="resnet18", input_size=256, task_weights=None, **kw):
    """A ``MultiTaskModel`` with the named encoder and one Taskonomy decoder per task of ``tasks`` (for an
    encoder of a smaller output stride, the decoder's last log2(stride) stages: ``DenseHead``).

    ``tasks``: letters (``"sdnE"``) or a list of letters/names; decoders follow the canonical task order.
    ``input_size``: the training resolution recorded in the config (any multiple of 32 runs).
    ``task_weights``: ``None`` (uniform) or a mapping from task letter or name to its loss weight.
    ``**kw``: passed to the encoder constructor and recorded so checkpoints rebuild the same model.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % STRIDE:
        raise ValueError(f"input_size must be a positive multiple of {STRIDE}, got {input_size!r}")
    name = canonical_encoder_name(encoder)
    resolved = task_registry.resolve(tasks)
    weights = _weights_by_name(resolved, task_weights)
    trunk = build_encoder(name, **kw)
    stride = getattr(trunk, "stride", STRIDE)
    decoders = {t.name: TaskonomyDecoder(trunk.out_channels, t.channels) if stride == STRIDE
                else DenseHead(trunk.out_channels, t.channels, stride) for t in resolved}
    config = {
        "encoder": name,
        "encoder_kwargs": dict(kw),
        "tasks": "".join(t.letter for t in resolved),
        "task_weights": weights,
        "input_size": input_size,
        "version": mtrobust_fast.__version__,
    }
    return MultiTaskModel(trunk, decoders, config)


SMALL_INPUT_MAX = 64  # classifiers for images this small or smaller get the 32-px ResNet stem


def build_classifier(encoder="resnet18", classes=10, input_size=32, loss="ce", normalization=None, name="class",
                     aux=(), domain_classes=None, head=None, domain_tasks=(), input_channels=3, **kw):
    """An image classifier as a :class:`MultiTaskModel`: ``{name: logits [B, classes]}``, plus one head per
    auxiliary task record of ``aux`` (:mod:`mtrobust_fast.tasks.auxiliary`: a linear head for rotation/jigsaw, a
    dense head back to the input resolution for the autoencoder), listed in ``config["auxiliary"]``.
    ``domain_classes``: also a ``"domain"`` head for a coarser label that comes with the data (superclasses).
    ``head``: the main head's task record when it is not a single-label classifier (a
    :class:`~mtrobust_fast.tasks.classification.MultiLabelTask`; ``classes``, ``loss`` and ``name`` then come from it).
    ``domain_tasks``: more heads for labels that come with the data (e.g. a chest X-ray's sex and age), each a
    linear head on the pooled features, listed in ``config["domain"]``. ``input_channels``: 3, or 1 for
    grayscale images (see :meth:`MultiTaskModel.encode`).

    Images up to ``SMALL_INPUT_MAX`` px use the 32-px ResNet stem (3×3 stride-1 convolution, no max-pool).
    ``normalization``: ``{"mean": [3 floats], "std": [3 floats]}`` applied inside the model, so attacks work
    on [0, 1] pixels (default mean 0.5, std 0.5). ``loss``: the head's training loss, "ce" or "bce" (sigmoid
    BCE on one-hot labels). ``**kw``: passed to the encoder and recorded.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
        raise ValueError(f"input_size must be an integer >= 8, got {input_size!r}")
    if input_channels not in (1, 3):
        raise ValueError(f"input_channels must be 1 or 3, got {input_channels!r}")
    if head is None:
        head = classification.ClassificationTask(name, classes, loss)
    name, classes = head.name, head.classes
    domain_tasks = list(domain_tasks)
    if domain_classes:
        domain_tasks.insert(0, classification.ClassificationTask("domain", domain_classes, loss))
    enc_name = canonical_encoder_name(encoder)
    kwargs = dict(kw)
    if input_size <= SMALL_INPUT_MAX:
        if not enc_name.startswith(("resnet", "wide_resnet")):
            raise ValueError(f"encoder {enc_name!r} has no stem for {input_size}-px images; use a ResNet "
                             f"(resnet18, resnet50, resnet152, wide_resnet50_2)")
        kwargs.setdefault("small_input", True)
    normalization = normalization or {"mean": [0.5] * input_channels, "std": [0.5] * input_channels}
    if len(normalization.get("mean", ())) != input_channels or len(normalization.get("std", ())) != input_channels \
            or any(not s > 0 for s in normalization["std"]):
        raise ValueError(f"normalization needs {input_channels} means and {input_channels} positive stds, got "
                         f"{normalization!r}")
    trunk = build_encoder(enc_name, **kwargs)
    heads = {name: ClassificationHead(trunk.out_channels, classes)}
    head_configs = {name: head.to_config()}
    for task in domain_tasks:
        if task.name in heads:
            raise ValueError(f"domain head name {task.name!r} is used twice")
        heads[task.name] = ClassificationHead(trunk.out_channels, task.classes)
        head_configs[task.name] = task.to_config()
    for task in aux:
        if task.name in heads:
            raise ValueError(f"aux: head name {task.name!r} is used twice")
        heads[task.name] = ClassificationHead(trunk.out_channels, task.classes) if hasattr(task, "classes") \
            else DenseHead(trunk.out_channels, task.channels, trunk.stride)
    config = {
        "kind": "classifier",
        "encoder": enc_name,
        "encoder_kwargs": kwargs,
        "tasks": name,
        "heads": {**head_configs, **{task.name: task.to_config() for task in aux}},
        "auxiliary": [task.name for task in aux],
        "domain": [task.name for task in domain_tasks],
        "input_channels": input_channels,
        "task_weights": {task: 1.0 for task in heads},
        "input_size": input_size,
        "input_stride": 1,
        "normalization": {k: [float(v) for v in normalization[k]] for k in ("mean", "std")},
        "version": mtrobust_fast.__version__,
    }
    return MultiTaskModel(trunk, heads, config)


def build_dense_model(records, encoder="resnet18", input_size=256, task_weights=None, normalization=None, **kw):
    """A dense multi-task model for the heads ``records`` (task records with ``channels``, e.g. NYUv2's
    :mod:`~mtrobust_fast.tasks.benchmarks` heads): the named encoder and one head per record, named after it. The
    head is the one the encoder asks for (``resnet50_dilated``: LibMTL's DeepLab ASPP head), else the Taskonomy
    decoder (stride 32) or its last stages (``DenseHead``). ``input_size``: the training height (any multiple of
    the encoder's stride runs, not only squares). ``normalization``: ``{"mean", "std"}`` applied inside the model
    (default none: [0, 1] pixels go in as they are, as LibMTL's loaders give them). ``task_weights``: by task name
    (default uniform 1/N). ``**kw``: passed to the encoder and recorded."""
    from mtrobust_fast.models.libmtl import IDENTITY_NORMALIZATION, DeepLabHead

    records = list(records)
    names = [r.name for r in records]
    if not records or len(set(names)) != len(names):
        raise ValueError(f"records must be one or more task records with distinct names, got {names}")
    name = canonical_encoder_name(encoder)
    trunk = build_encoder(name, **kw)
    stride = getattr(trunk, "stride", STRIDE)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % stride:
        raise ValueError(f"input_size must be a positive multiple of {stride} (the {name} encoder's stride), got "
                         f"{input_size!r}")
    head = getattr(trunk, "head", None)

    def decoder(record):
        if head == "aspp":
            return DeepLabHead(trunk.out_channels, record.channels, stride)
        if stride == STRIDE:
            return TaskonomyDecoder(trunk.out_channels, record.channels)
        dense = DenseHead(trunk.out_channels, record.channels, stride)
        if getattr(record, "scale_invariant", False):  # its loss's gradient is unbounded at the zero output
            nn.init.normal_(dense[-1].weight, 0.0, 1e-3)
        return dense

    weights = {n: 1.0 / len(names) for n in names} if task_weights is None else \
        {n: float(task_weights[n]) for n in names}
    normalization = normalization or IDENTITY_NORMALIZATION
    config = {
        "kind": "dense",
        "encoder": name,
        "encoder_kwargs": dict(kw),
        "tasks": task_registry.task_string(names),
        "heads": {r.name: r.to_config() for r in records},
        "task_weights": weights,
        "input_size": input_size,
        "input_stride": stride,
        "normalization": {k: [float(v) for v in normalization[k]] for k in ("mean", "std")},
        "version": mtrobust_fast.__version__,
    }
    return MultiTaskModel(trunk, {r.name: decoder(r) for r in records}, config)


def model_from_config(config):
    """Rebuild (fresh weights) the model a ``MultiTaskModel.config`` describes."""
    if config.get("kind") == "dense":
        heads = config["heads"]
        return build_dense_model([classification.task_from_config(n, heads[n]) for n in heads], config["encoder"],
                                 config["input_size"], config["task_weights"], config.get("normalization"),
                                 **config.get("encoder_kwargs", {}))
    if config.get("kind") == "classifier":
        kwargs = dict(config.get("encoder_kwargs", {}))
        kwargs.pop("small_input", None)
        auxiliary = config.get("auxiliary", [])
        heads = config["heads"]
        domain = config.get("domain", ["domain"] if "domain" in heads else [])  # older configs: one "domain" head
        (name,) = [n for n in heads if n not in auxiliary and n not in domain]
        aux = [classification.task_from_config(n, heads[n]) for n in auxiliary]
        model = build_classifier(config["encoder"], input_size=config["input_size"],
                                 normalization=config.get("normalization"), aux=aux,
                                 head=classification.task_from_config(name, heads[name]),
                                 domain_tasks=[classification.task_from_config(n, heads[n]) for n in domain],
                                 input_channels=config.get("input_channels", 3), **kwargs)
        model.config["task_weights"] = dict(config["task_weights"])
        return model
    return build_model(
        tasks=config["tasks"],
        encoder=config["encoder"],
        input_size=config["input_size"],
        task_weights=config["task_weights"],
        **config.get("encoder_kwargs", {}),
    )
