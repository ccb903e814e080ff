"""Task heads: the Taskonomy up-sampling decoder (one per dense task, ×32 up-sampling from the shared
representation) and the classification head."""
import torch.nn as nn

from mtrobust_fast.models.encoders import init_weights

# Output channels of the five up-sampling stages (each one doubles the resolution).
STAGE_CHANNELS = (256, 128, 64, 48, 32)


def _up(in_channels, out_channels):
    """2×2/2 transposed convolution + BN + ReLU: doubles the resolution."""
    return [nn.ConvTranspose2d(in_channels, out_channels, 2, 2), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _refine(in_channels, out_channels):
    """3×3 convolution + BN + ReLU at constant resolution."""
    return [nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class TaskonomyDecoder(nn.Sequential):
    """Five [up, refine] stages (256, 128, 64, 48, 32 channels); the last refine is a plain 3×3 conv to the task.

    The output is raw (logits or regression, no activation). Convolutions keep their biases, which gives the
    source's parameter count (1,504,512 + 289·C for a 512-channel input).
    """

    def __init__(self, in_channels, out_channels):
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        layers, channels = [], in_channels
        for i, width in enumerate(STAGE_CHANNELS):
            layers += _up(channels, width)
            if i < len(STAGE_CHANNELS) - 1:
                layers += _refine(width, width)
            channels = width
        layers.append(nn.Conv2d(channels, out_channels, 3, 1, 1))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels
        init_weights(self)


class ClassificationHead(nn.Sequential):
    """Global average pooling and one linear layer to ``classes`` logits."""

    def __init__(self, in_channels, classes):
        if in_channels < 1 or classes < 2:
            raise ValueError(f"in_channels must be positive and classes >= 2, got {in_channels}, {classes}")
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, classes))
        self.in_channels, self.classes = in_channels, classes
