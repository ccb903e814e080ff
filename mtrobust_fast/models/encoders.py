"""Shared encoders of the hard-parameter-sharing models: ResNets, a wide ResNet and a small Xception.

Every encoder maps a [B, 3, H, W] image (already normalised by the model) to a feature map at its ``stride``
(32 for the paper's architectures), [B, out_channels, H/stride, W/stride], and exposes ``out_channels`` and
``stride`` so decoders can be built for it. There are no
classification layers (no global pooling, no fully-connected head) and no pretrained weights: the source
trained its Taskonomy models from scratch.
"""
import math

import torch.nn as nn

from mtrobust_fast.registry import Registry

ENCODERS = Registry("encoder")  # constructors ``**kw -> nn.Module`` with ``out_channels``, registered below


def init_weights(module):
    """He-normal convolutions (std √(2/n), n = k·k·out_channels), zero biases, BatchNorm (1, 0), as the source."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = m.kernel_size
            n = kh * kw * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn(in_channels, out_channels, kernel_size, stride=1, groups=1):
    """A bias-free 'same'-padded convolution followed by BatchNorm (the ResNet building brick)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, base_width=64):
        super().__init__()
        if base_width != 64:
            raise ValueError(f"BasicBlock supports only base_width=64, got {base_width}")
        out_channels = width * self.expansion
        self.branch = nn.Sequential(
            conv_bn(in_channels, width, 3, stride), nn.ReLU(inplace=True), conv_bn(width, out_channels, 3)
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4; ``base_width`` widens the inner convs (WRN)."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, base_width=64):
        super().__init__()
        inner = width * base_width // 64
        out_channels = width * self.expansion
        self.branch = nn.Sequential(
            conv_bn(in_channels, inner, 1), nn.ReLU(inplace=True),
            conv_bn(inner, inner, 3, stride), nn.ReLU(inplace=True),
            conv_bn(inner, out_channels, 1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.branch(x) + self.shortcut(x))


def _shortcut(in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride)


class ResNetEncoder(nn.Module):
    """ResNet trunk: 7×7/2 stem + 3×3/2 max-pool, then four stages at strides 4, 8, 16, 32.

    ``small_input``: the stem of ResNets for 32-px images (CIFAR): one 3×3 stride-1 convolution, no max-pool,
    so the stages run at strides 1, 2, 4, 8. ``stem_stride=2``: one 3×3 stride-2 convolution, no max-pool
    (stages at strides 2, 4, 8, 16). ``widths``: the stages' channels (ResNet's 64, 128, 256, 512; the stem
    has the first)."""

    def __init__(self, block, layers, base_width=64, small_input=False, widths=(64, 128, 256, 512), stem_stride=None):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be four positive channel counts, got {widths}")
        stem_stride = stem_stride or (1 if small_input else 4)
        if stem_stride not in (1, 2, 4) or (small_input and stem_stride != 1):
            raise ValueError(f"stem_stride must be 1, 2 or 4 (1 with small_input), got {stem_stride}")
        stem = {1: [conv_bn(3, widths[0], 3, 1), nn.ReLU(inplace=True)],
                2: [conv_bn(3, widths[0], 3, 2), nn.ReLU(inplace=True)],
                4: [conv_bn(3, widths[0], 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]}[stem_stride]
        self.stem = nn.Sequential(*stem)
        self.stride = 8 * stem_stride
        stages, in_channels = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_channels, width, stride, base_width))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels
        init_weights(self)

    def forward(self, x):
        return self.stages(self.stem(x))


class SeparableConv(nn.Sequential):
    """Depthwise k×k then pointwise 1×1 convolution (no bias: a BatchNorm always follows)."""

    def __init__(self, in_channels, out_channels, kernel_size=3):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, 1, kernel_size // 2, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """Pre-activated separable convolutions (ReLU, sepconv, BN) × ``reps`` with a residual shortcut.

    The first sepconv grows the channels; a stride-2 block ends in a learned 2×2/2 convolution, as the
    source's small Xception did instead of max-pooling.
    """

    def __init__(self, in_channels, out_channels, reps=2, stride=1, start_with_relu=True):
        super().__init__()
        layers, channels = [], in_channels
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv(channels, out_channels), nn.BatchNorm2d(out_channels)]
            channels = out_channels
        if stride != 1:
            layers.append(nn.Conv2d(out_channels, out_channels, 2, stride))
        self.branch = nn.Sequential(*layers)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class XceptionSmallEncoder(nn.Module):
    """The source's small Xception (entry 24→48 ch, blocks 96/192/512, four 512-ch middle blocks, 256-ch out).

    Difference from the source: its trunk stopped at stride 16 and used its own separable decoder; here the
    first middle block also halves the resolution, so every encoder ends at stride 32 and shares one decoder.
    """

    def __init__(self, widths=(24, 48, 96, 192, 512), middle_blocks=4, out_channels=256):
        super().__init__()
        stem_a, stem_b, *entry = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_a, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_a), nn.ReLU(inplace=True),
            nn.Conv2d(stem_a, stem_b, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_b), nn.ReLU(inplace=True),
        )
        blocks, channels = [], stem_b
        for i, width in enumerate(entry):
            blocks.append(XceptionBlock(channels, width, stride=2, start_with_relu=i > 0))
            channels = width
        for i in range(middle_blocks):
            blocks.append(XceptionBlock(channels, channels, stride=2 if i == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            SeparableConv(channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
        self.out_channels = out_channels
        self.stride = 32
        init_weights(self)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


@ENCODERS.register("resnet18")
def resnet18(**kw):
    return ResNetEncoder(BasicBlock, [2, 2, 2, 2], **kw)


@ENCODERS.register("resnet18_cpu")
def resnet18_cpu(**kw):
    """ResNet-18 for CPU-scale runs on small images: a quarter of the channels (16-128) and a 3×3 stride-2
    stem without max-pool, so the representation is at stride 16 (4×4 at 64 px, where ResNet-18's is 2×2)
    at about ResNet-18's cost per pixel; its dense heads are the Taskonomy decoder's last four stages.
    With ``small_input`` (classifiers on 32-px images) it keeps the 3×3 stride-1 stem of that setting."""
    kw.setdefault("widths", (16, 32, 64, 128))
    if not kw.get("small_input"):
        kw.setdefault("stem_stride", 2)
    return ResNetEncoder(BasicBlock, [2, 2, 2, 2], **kw)


@ENCODERS.register("resnet50")
def resnet50(**kw):
    return ResNetEncoder(Bottleneck, [3, 4, 6, 3], **kw)


@ENCODERS.register("resnet152")
def resnet152(**kw):
    return ResNetEncoder(Bottleneck, [3, 8, 36, 3], **kw)


@ENCODERS.register("wide_resnet50_2")
def wide_resnet50_2(**kw):
    return ResNetEncoder(Bottleneck, [3, 4, 6, 3], base_width=128, **kw)


@ENCODERS.register("xception_small")
def xception_small(**kw):
    return XceptionSmallEncoder(**kw)
