"""LibMTL's hard-parameter-sharing model for NYUv2 and Cityscapes, and the import of state dicts its trainer saved.

The architecture, as LibMTL's NYUv2/Cityscapes examples build it: a ResNet-50 whose last two stages replace
their stride by dilation (output stride 8: layer3's 3×3 convolutions dilated by 2, layer4's by 4, the first
3×3 of each stage by half that, the stride-2 convolutions made stride 1), shared by all tasks; per task a
DeepLab-v3 head: ASPP (a 1×1 branch, three 3×3 branches dilated 12, 24 and 36, and an image-pooling branch,
256 channels each, concatenated, projected to 256 with dropout 0.5), a 3×3 convolution + BatchNorm + ReLU and a
1×1 convolution to the task's outputs; the outputs are up-sampled bilinearly (corners aligned) to the input
size. The images go in as [0, 1] RGB without mean/std normalisation, as LibMTL's loaders give them.

Module names follow LibMTL's (``encoder.conv1``, ``encoder.layer1.0.conv1``, ``encoder.layer1.0.downsample.0``,
``decoders.<task>.0.convs.1.0``, ...), so an import is a renaming of the task keys only: LibMTL's task names
``segmentation``, ``depth`` and ``normal`` become this project's ``segment_semantic``, ``depth_zbuffer`` and
``normal``. Weights are trained from scratch here (LibMTL starts from ImageNet weights, which need a download).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrobust_fast.models.encoders import ENCODERS, init_weights

OUTPUT_STRIDE = 8
ASPP_RATES = (12, 24, 36)
ASPP_CHANNELS = 256
TASK_NAMES = {"segmentation": "segment_semantic", "depth": "depth_zbuffer", "normal": "normal"}
WEIGHTING_KEYS = ("loss_scale",)  # parameters some LibMTL weightings (UW, GradNorm, IMTL) keep in the model
IDENTITY_NORMALIZATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3×3), with a dilation for the dilated stages."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, dilation=1, first_dilation=None):
        super().__init__()
        out_channels = width * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, first_dilation, dilation=first_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetDilated(nn.Module):
    """ResNet with output stride 8 (see the module docstring); [B, 3, H, W] -> [B, 2048, H/8, W/8]."""

    head = "aspp"  # the decoder LibMTL puts on it

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        stages = []
        # (width, stride, dilation of the first block's 3x3, dilation of the other blocks' 3x3s)
        for blocks, (width, stride, first, rest) in zip(layers, ((64, 1, 1, 1), (128, 2, 1, 1), (256, 1, 1, 2),
                                                                 (512, 1, 2, 4))):
            stage = [Bottleneck(channels, width, stride, rest, first)]
            channels = width * Bottleneck.expansion
            stage += [Bottleneck(channels, width, 1, rest) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = channels
        self.stride = OUTPUT_STRIDE
        init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@ENCODERS.register("resnet50_dilated")
def resnet50_dilated(**kw):
    """LibMTL's shared encoder for NYUv2 and Cityscapes (output stride 8, 2048 channels); its models get ASPP
    heads."""
    return ResNetDilated(**kw)


def _conv_bn_relu(in_channels, out_channels, kernel, dilation=1):
    padding = dilation if kernel == 3 else 0
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels, rates=ASPP_RATES, channels=ASPP_CHANNELS):
        super().__init__()
        branches = [nn.Sequential(*_conv_bn_relu(in_channels, channels, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, channels, 3, rate)) for rate in rates]
        branches.append(ASPPPooling(in_channels, channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * channels, channels, 1), nn.Dropout(0.5))

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, 3×3 conv + BN + ReLU, 1×1 conv to ``out_channels``; the output up-sampled ×``stride`` bilinearly
    with aligned corners (what LibMTL's trainers do to every prediction)."""

    def __init__(self, in_channels, out_channels, stride=OUTPUT_STRIDE):
        super().__init__(ASPP(in_channels), *_conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3),
                         nn.Conv2d(ASPP_CHANNELS, out_channels, 1))
        self.stride = stride

    def forward(self, x):
        size = (x.shape[-2] * self.stride, x.shape[-1] * self.stride)
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=True)


# ---- import ----

def is_libmtl_state_dict(payload):
    """Whether ``payload`` looks like a state dict LibMTL's trainer saved (``torch.save(model.state_dict())``)."""
    return isinstance(payload, dict) and any(isinstance(k, str) and k.startswith("encoder.layer4.") for k in payload) \
        and any(isinstance(k, str) and k.startswith("decoders.") for k in payload)


def convert(state_dict, where="the file"):
    """``{"config", "state_dict", "meta"}`` for a LibMTL HPS state dict (see the module docstring): the model
    config (an NYUv2 model when it has a normal head, else a Cityscapes one), the renamed tensors, and what was
    dropped (a weighting's ``loss_scale``). Every tensor must land on a parameter or buffer of the same shape and
    every parameter and buffer must be given: anything else is an error naming the keys."""
    from mtrobust_fast.models.checkpoint import FORMAT
    from mtrobust_fast.models.registry import build_dense_model
    from mtrobust_fast.tasks.benchmarks import DepthTask, NormalTask, SegmentationTask

    if not is_libmtl_state_dict(state_dict):
        raise ValueError(f"{where}: not a LibMTL state dict (no encoder.layer4.* and decoders.* keys)")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: values must be tensors; {bad[:3]} are not")
    dropped = sorted(k for k in state_dict if k in WEIGHTING_KEYS)
    tasks = sorted({k.split(".")[1] for k in state_dict if k.startswith("decoders.")})
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"{where}: decoders for {unknown}; LibMTL's NYUv2/Cityscapes tasks are "
                         f"{', '.join(TASK_NAMES)}")
    if "segmentation" not in tasks:
        raise ValueError(f"{where}: no segmentation decoder (decoders.segmentation.*)")
    classes = state_dict["decoders.segmentation.4.weight"].shape[0] \
        if "decoders.segmentation.4.weight" in state_dict else None
    if classes is None:
        raise ValueError(f"{where}: decoders.segmentation.4.weight (the head's last convolution) is missing")
    records = {"segmentation": SegmentationTask("segment_semantic", int(classes)),
               "depth": DepthTask("depth_zbuffer"), "normal": NormalTask("normal")}
    benchmark = "nyuv2" if "normal" in tasks else "cityscapes"
    model = build_dense_model([records[t] for t in TASK_NAMES if t in tasks], "resnet50_dilated",
                              input_size=288 if benchmark == "nyuv2" else 128, normalization=IDENTITY_NORMALIZATION)
    renamed = {}
    for key, value in state_dict.items():
        if key in WEIGHTING_KEYS:
            continue
        parts = key.split(".")
        if parts[0] == "decoders":
            parts[1] = TASK_NAMES[parts[1]]
        renamed[".".join(parts)] = value
    ours = model.state_dict()
    missing = sorted(set(ours) - set(renamed))
    unexpected = sorted(set(renamed) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{where}: not LibMTL's HPS ResNet-50-dilated + DeepLab heads: "
                         + (f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}" if unexpected else ""))
    wrong = [k for k in ours if ours[k].shape != renamed[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{where}: {k} has shape {list(renamed[k].shape)}, the architecture needs "
                         f"{list(ours[k].shape)} ({len(wrong)} such tensors)")
    renamed = {k: renamed[k].to(ours[k].dtype) if ours[k].is_floating_point() and renamed[k].is_floating_point()
               else renamed[k] for k in ours}
    mixed = [k for k in ours if ours[k].is_floating_point() != renamed[k].is_floating_point()]
    if mixed:
        raise ValueError(f"{where}: {mixed[0]} is stored as {renamed[mixed[0]].dtype}, not as floating point")
    meta = {"epoch": None, "source": "libmtl", "benchmark": benchmark, "dropped_keys": dropped}
    return {"format": FORMAT, "config": dict(model.config), "state_dict": renamed, "meta": meta}
