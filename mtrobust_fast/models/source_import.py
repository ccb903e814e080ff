"""Import checkpoints written by the MTRobust / AAAI'22 Taskonomy training code (``checkpoint_150.pth.tar``,
``checkpoint_latest.pth.tar``) as this project's models.

The source file is a dict ``{"epoch", "arch", "state_dict", "best_prec1"}`` whose state dict carries the
DataParallel prefix ``module.``. Its model is a torchvision-style ResNet trunk under ``encoder.`` (``conv1``,
``bn1``, ``layer1`` … ``layer4``; blocks with ``conv1/bn1``, ``conv2/bn2``, for bottlenecks ``conv3/bn3``, and a
``downsample`` pair of 1×1 convolution and BatchNorm) and one up-sampling decoder per task under
``task_to_decoder.<source task name>.`` (``upconv0..4`` transposed convolutions each followed by
``bn_upconv0..4``, ``conv_decode0..3`` refinements each followed by ``bn_decode0..3``, and the final
``conv_decode4``). That is exactly the layout of this project's encoders and ``TaskonomyDecoder``, so an import
is a renaming: :func:`source_to_ours` gives, for every tensor of our model, the source name it comes from.
Source task names are the Taskonomy folder names, except ``segmentsemantic`` for ``segment_semantic``.

Preprocessing: the source models take RGB images scaled from [0, 1] to [-1, 1] (x·2 − 1, no mean/std), at
256×256. Our multi-task models apply that same mapping to [0, 1] inputs themselves, so an imported model fed
[0, 1] images gives the outputs the source model gave on its inputs. Outputs are raw (segmentation logits over
the 18 Taskonomy labels, regression maps in the source's target encodings).

Architectures: ResNet-18, ResNet-50, ResNet-152 and Wide-ResNet-50-2. The AAAI'22 Xception variants used a
different trunk and a separable decoder that this project's models do not reproduce; they are refused with an
error. The file is read with ``torch.load(weights_only=True)`` only.
"""
import re

import torch

from mtrobust_fast import task_names
from mtrobust_fast.models.decoders import STAGE_CHANNELS

# The source's ``--arch`` names (and the registry's own) -> our encoder names.
ARCHITECTURES = {
    "resnet18": "resnet18", "resnet50": "resnet50", "resnet152": "resnet152",
    "wresnet50": "wide_resnet50_2", "wide_resnet50_2": "wide_resnet50_2",
}
REFUSED = ("xception", "xception-full", "resnet34", "resnet101", "wresnet101")
SOURCE_TASK_NAMES = {"segmentsemantic": "segment_semantic"}
_BLOCK_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet152": (3, 8, 36, 3),
                 "wide_resnet50_2": (3, 4, 6, 3)}
INPUT_SIZE = 256  # what the source trained and evaluated at


class SourceCheckpointError(ValueError):
    """A file that is not a source checkpoint this project can import; the message says why."""


def is_source_payload(payload):
    """Whether a loaded dict looks like a source checkpoint (a state dict with a ``encoder.conv1`` trunk)."""
    if not isinstance(payload, dict) or "format" in payload or not isinstance(payload.get("state_dict"), dict):
        return False
    return any(_strip(k) == "encoder.conv1.weight" for k in payload["state_dict"])


def _strip(key):
    return key[len("module."):] if key.startswith("module.") else key


def _decoder_names(stage):
    """Our decoder's Sequential indices of stage ``stage`` -> the source's attribute names."""
    base = 6 * stage
    names = {base: f"upconv{stage}", base + 1: f"bn_upconv{stage}"}
    if stage < len(STAGE_CHANNELS) - 1:
        names.update({base + 3: f"conv_decode{stage}", base + 4: f"bn_decode{stage}"})
    else:
        names[base + 3] = f"conv_decode{stage}"
    return names


_DECODER = {index: name for stage in range(len(STAGE_CHANNELS)) for index, name in _decoder_names(stage).items()}
# Our block branch indices (conv_bn pairs at 0, 2, 4) -> the source's conv/bn numbers 1, 2, 3.
_BRANCH = {"0": "1", "2": "2", "4": "3"}


def source_name(ours, source_tasks):
    """The source's state-dict name of our model's tensor ``ours`` (``source_tasks``: our task name -> source
    task name)."""
    parts = ours.split(".")
    if parts[0] == "encoder":
        if parts[1] == "stem":  # stem.0 = conv_bn(conv 0, bn 1)
            return f"encoder.{'conv1' if parts[3] == '0' else 'bn1'}.{parts[4]}"
        stage, block, kind = int(parts[2]) + 1, parts[3], parts[4]
        if kind == "branch":
            layer = ("conv" if parts[6] == "0" else "bn") + _BRANCH[parts[5]]
            return f"encoder.layer{stage}.{block}.{layer}.{parts[7]}"
        return f"encoder.layer{stage}.{block}.downsample.{parts[5]}.{parts[6]}"
    task, index, leaf = parts[1], int(parts[2]), parts[3]
    return f"task_to_decoder.{source_tasks[task]}.{_DECODER[index]}.{leaf}"


def _architecture(payload, arch):
    name = arch if arch is not None else payload.get("arch")
    if not isinstance(name, str) or not name:
        raise SourceCheckpointError("the file does not name its architecture ('arch'); pass one of "
                                    f"{', '.join(sorted(ARCHITECTURES))}")
    key = name.lower().removesuffix("_taskonomy")
    if key in REFUSED or key.startswith("xception"):
        raise SourceCheckpointError(
            f"architecture {name!r} cannot be imported: only ResNet-18, ResNet-50, ResNet-152 and Wide-ResNet-50-2 "
            f"({', '.join(sorted(ARCHITECTURES))}) have this project's layout")
    if key not in ARCHITECTURES:
        raise SourceCheckpointError(f"unknown architecture {name!r}; importable: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[key]


def _tasks(state):
    """{our task name: source task name} from the decoder keys, in the canonical task order."""
    found = dict.fromkeys(m.group(1) for k in state for m in [re.match(r"task_to_decoder\.([^.]+)\.", k)] if m)
    if not found:
        raise SourceCheckpointError("the state dict has no task decoder (task_to_decoder.<task>.*)")
    ours = {}
    for source in found:
        name = SOURCE_TASK_NAMES.get(source, source)
        if name not in task_names.LETTERS:
            raise SourceCheckpointError(f"decoder {source!r} is not one of the 11 dense Taskonomy tasks this project "
                                        f"models (classification heads such as class_object cannot be imported)")
        ours[name] = source
    return {name: ours[name] for name in sorted(ours, key=lambda n: task_names.CANONICAL_ORDER.index(
        task_names.LETTERS[n]))}


def _list(items):
    more = f" … (+{len(items) - 8} more)" if len(items) > 8 else ""
    return ", ".join(items[:8]) + more


def convert(payload, arch=None, where="checkpoint"):
    """Our checkpoint payload (``format``, ``config``, ``state_dict``, ``meta``) for a loaded source payload.

    Every tensor of our model must come from the source file with the right shape, and every tensor of the file
    must be used (BatchNorm's ``num_batches_tracked`` counters, which old files lack, are the only exception:
    missing ones start at 0); anything else is an error listing the missing and unexpected names."""
    from mtrobust_fast.models.checkpoint import FORMAT
    from mtrobust_fast.models.registry import build_model

    encoder = _architecture(payload, arch)
    state = {_strip(k): v for k, v in payload["state_dict"].items()}
    tasks = _tasks(state)
    letters = "".join(task_names.LETTERS[name] for name in tasks)
    model = build_model(letters, encoder, input_size=INPUT_SIZE)
    mapping = {ours: source_name(ours, tasks) for ours in model.state_dict()}
    expected = set(mapping.values())
    missing = [s for s in mapping.values() if s not in state and not s.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        layers = "-".join(map(str, _BLOCK_LAYERS[encoder]))
        raise SourceCheckpointError(
            f"{where}: its state dict does not match architecture {encoder} (blocks {layers}) with decoders for "
            f"{', '.join(tasks.values())}: {len(missing)} missing ({_list(missing)}); {len(unexpected)} unexpected "
            f"({_list(unexpected)})")
    ours_state = model.state_dict()
    converted = {}
    for ours, source in mapping.items():
        value = state.get(source)
        if value is None:  # a num_batches_tracked counter the file predates
            converted[ours] = torch.zeros_like(ours_state[ours])
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ours_state[ours].shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SourceCheckpointError(f"{where}: {source} has shape {shape}, architecture {encoder} needs "
                                        f"{tuple(ours_state[ours].shape)}")
        converted[ours] = value.to(ours_state[ours].dtype)
    meta = {"epoch": int(payload["epoch"]) if isinstance(payload.get("epoch"), int) else None,
            "imported_from": {"path": where, "arch": str(payload.get("arch", arch)),
                              "best_prec1": _plain_number(payload.get("best_prec1")),
                              "format": "MTRobust/AAAI'22 checkpoint"}}
    return {"format": FORMAT, "config": dict(model.config), "state_dict": converted, "meta": meta}


def _plain_number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

