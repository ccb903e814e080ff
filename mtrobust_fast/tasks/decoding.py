"""Taskonomy's label files decoded: PNG pixels to a target tensor and its validity, per task.

Deliberate differences from MTRobust (the training code the AAAI'22 study forked):
- Segmentation keeps Taskonomy's raw labels (0 uncertain -> ignored, 1 background, 2..17 objects); the source
  folded "uncertain" into background.
- Principal curvature decodes the R and G channels; the source read the RGB file as grayscale.
- Edge occlusion is clipped before it is mapped to [-1, 1]; the source left values up to about 21.
- Masks come from the raw values at full resolution (the loader resizes them with nearest neighbour);
  the source bilinearly resized masks and binarised them at 0.99.
- The autoencoder target is the input image in [0, 1], the project's pixel space (source: [-1, 1]).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SEGMENT_CLASSES = 18  # logits; Taskonomy labels 0..17
SEGMENT_IGNORE = 0  # "uncertain" pixels
DEPTH_INVALID_FROM = 64500  # raw 16-bit depth at or above this is a hole (65535 marks sky / no mesh)
NORMAL_INVALID = 128  # (128, 128, 128) marks pixels without geometry
CURVATURE_MEAN = (123.572, 120.1)  # MTRobust's intended normalisation of the (R, G) = (k1, k2) channels
CURVATURE_STD = (31.922, 21.658)
KEYPOINTS2D_CLIP = 0.005  # fractions of 65535 mapped onto [-1, 1], as in MTRobust
EDGE_TEXTURE_CLIP = 0.08
EDGE_OCCLUSION_CLIP = 0.00625
OCCLUSION_BLUR_FRACTION = 1 / 64  # Gaussian sigma as a fraction of the height: 4 px at 256 x 256

FORMAT_NAMES = {"gray8": "8-bit grayscale", "rgb8": "8-bit RGB", "gray16": "16-bit grayscale"}


def image_array(image):
    """A PNG's pixels as numpy: uint8 [H,W] or [H,W,3], or uint16 [H,W] for 16-bit grayscale.

    Pillow opens 16-bit grayscale PNGs as mode "I;16" (recent versions) or "I" (older ones); both give uint16.
    Arrays pass through unchanged.
    """
    if isinstance(image, np.ndarray):
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
    if image.mode in ("L", "RGB"):
        return np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError("mode 'I' image has values outside the 16-bit range")
        return pixels.astype(np.uint16)
    raise ValueError(f"unsupported image mode {image.mode!r}; Taskonomy PNGs are L, RGB or 16-bit grayscale")


def array_format(pixels):
    """The format name ("gray8", "rgb8", "gray16") of a pixel array, or a description of what it is."""
    if pixels.dtype == np.uint8 and pixels.ndim == 2:
        return "gray8"
    if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        return "rgb8"
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        return "gray16"
    return f"{pixels.dtype} array of shape {tuple(pixels.shape)}"


# ---- raw pixels -> (target, own validity or None) ----

def _chw(values):
    """float64 numpy [H,W] or [H,W,C] -> float32 torch [C,H,W]."""
    values = values[..., None] if values.ndim == 2 else values
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32))


def segment_target(pixels):
    top = int(pixels.max()) if pixels.size else 0
    if top >= SEGMENT_CLASSES:
        raise ValueError(f"segment_semantic labels must be in 0..{SEGMENT_CLASSES - 1}, found {top}")
    return torch.from_numpy(pixels.astype(np.int64)), pixels != SEGMENT_IGNORE


def depth_target(pixels):
    return _chw(np.log1p(pixels.astype(np.float64)) / math.log(2 ** 16)), pixels < DEPTH_INVALID_FROM


def normal_target(pixels):
    return _chw(pixels / 127.5 - 1.0), ~np.all(pixels == NORMAL_INVALID, axis=2)


def curvature_target(pixels):
    rg = (pixels[..., :2] - np.array(CURVATURE_MEAN)) / np.array(CURVATURE_STD)
    return _chw(rg), np.any(pixels != 0, axis=2)


def reshading_target(pixels):
    gray = pixels if pixels.ndim == 2 else pixels[..., 0]
    return _chw(gray / 127.5 - 1.0), None


def heatmap_target(pixels, clip):
    """16-bit map -> fraction of 65535, clipped to [0, clip], mapped onto [-1, 1]."""
    return _chw(np.clip(pixels / 65535.0, 0.0, clip) / clip * 2.0 - 1.0), None


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of [C,H,W], truncated at 4 sigma, edges replicated."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    padded = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0]


def occlusion_target(pixels):
    """Clipped (unlike the source) then blurred with sigma = H/64, i.e. the source's 4 px at 256 x 256."""
    target, _ = heatmap_target(pixels, EDGE_OCCLUSION_CLIP)
    blurred = _gaussian_blur(target, pixels.shape[0] * OCCLUSION_BLUR_FRACTION)
    return blurred.clamp_(-1.0, 1.0), None  # only float rounding can leave [-1, 1] here


def autoencoder_target(pixels):
    return _chw(pixels / 255.0), None
