"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layout that MTAN released and LibMTL reads.

The layout, as those projects' loaders read it: ``ROOT/{train,val}/{folder}/{i}.npy`` with ``i`` = 0 … n−1 in
every folder of a split:

- ``image``: float [H, W, 3], RGB in [0, 1] (NYUv2 288×384, Cityscapes 128×256);
- ``label``: float or int [H, W], class indices (NYUv2 13 classes, Cityscapes 7), −1 where unlabelled;
- ``depth``: float [H, W, 1] or [H, W], 0 where unknown (NYUv2 metres; Cityscapes MTAN's inverse depth);
- ``normal`` (NYUv2 only): float [H, W, 3], unit camera-frame normals, the zero vector where unknown.

NYUv2's 13 classes, in label order: bed, books, ceiling, chair, floor, furniture, objects, picture, sofa, table,
tv, wall, window. Cityscapes' 7: flat, construction, object, nature, sky, human, vehicle (the 19-class labels of
MTAN's release are not read). The MTAN release of Cityscapes names its 7-class folder ``label_7``; either name is
read.

Samples are ``(image [3,H,W] in [0,1], targets, masks)`` keyed by task name: the heads take the names of the
Taskonomy tasks that measure the same thing (``segment_semantic``: int64 [H,W] labels, ``depth_zbuffer``:
[1,H,W], ``normal``: [3,H,W]); masks are bool [1,H,W] (labelled pixels, depth > 0, a non-zero normal) and targets
are 0 where the mask is False. These benchmarks have a training and a validation split only; papers on them
select and report on the validation split, and so does this reader for ``val`` and ``test`` alike.

The official Cityscapes release is read too (``CityscapesFolders``): ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``
with ``gtFine/.../*_gtFine_labelIds.png`` (the 34 label ids grouped into the 7 categories above; the void ids
0–6 are unlabelled) and, when present, ``disparity/.../*_disparity.png`` (disparity (p − 1) / 256 for p > 0,
unknown where p = 0; MTAN's preprocessed "depth" is a rescaled version of it, so values differ by a factor).
Its images are 1024×2048: give ``size`` (MTAN used 128).

``size``: None keeps the files' resolution; an int resizes every sample to that height (the width in proportion,
rounded to a multiple of 32, which every encoder accepts): images bilinearly, labels, depths and normals by nearest neighbour so that no
value is blended with an unknown one.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtrobust_fast import task_names
from mtrobust_fast.data import refuse_unfinished
from mtrobust_fast.registry import Registry
from mtrobust_fast.tasks.benchmarks import DepthTask, NormalTask, SegmentationTask

LAYOUTS = Registry("dense benchmark layout")
SPLIT_FOLDERS = {"train": "train", "val": "val", "test": "val"}
NYUV2_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
                 "tv", "wall", "window")
CITYSCAPES_CLASSES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
WIDTH_MULTIPLE = 32  # resized widths: what every encoder accepts (its largest output stride)
MIN_SIZE = 8


@dataclass
class Layout:
    """One benchmark: its task heads (task name -> folder), the segmentation classes and the native size."""

    name: str
    folders: dict  # task name -> folder name(s) tried in order
    class_names: tuple
    native: tuple  # (H, W) of the real release

    def records(self, names=None):
        """The task records of the heads ``names`` (all by default), in the layout's order."""
        chosen = list(self.folders) if names is None else list(names)
        makers = {"segment_semantic": lambda: SegmentationTask("segment_semantic", len(self.class_names)),
                  "depth_zbuffer": lambda: DepthTask("depth_zbuffer"), "normal": lambda: NormalTask("normal")}
        return [makers[name]() for name in self.folders if name in chosen]

    def detect(self, root):
        split = Path(root) / "train"
        return (split / "image").is_dir() and all(any((split / f).is_dir() for f in folders)
                                                   for folders in self.folders.values())

    def open(self, root, tasks=None, split="train", size=None):
        return BenchmarkDataset(root, tasks, split, size, layout=self)


LAYOUTS.register("nyuv2")(Layout("nyuv2", {"segment_semantic": ("label",), "depth_zbuffer": ("depth",),
                                           "normal": ("normal",)}, NYUV2_CLASSES, (288, 384)))
LAYOUTS.register("cityscapes")(Layout("cityscapes", {"segment_semantic": ("label", "label_7"),
                                                     "depth_zbuffer": ("depth",)}, CITYSCAPES_CLASSES, (128, 256)))


def find_layout(root):
    """The benchmark layout at ``root`` (NYUv2 before Cityscapes: a folder with normals is NYUv2), or None. A
    layout has ``name``, ``class_names``, ``records(names)``, ``detect(root)`` and ``open(root, tasks, split,
    size)``."""
    for layout in LAYOUTS.values():
        if layout.detect(root):
            return layout
    return None


def open_benchmark(root, tasks=None, split="train", size=None):
    """Split ``split`` of the NYUv2 / Cityscapes root ``root`` with the heads ``tasks`` (letters or names; all by
    default), read by the layout that detects it."""
    refuse_unfinished(root)
    layout = find_layout(root)
    if layout is None:
        raise FileNotFoundError(f"{root} is not a NYUv2 or Cityscapes root (the preprocessed layout: "
                                f"train/image/0.npy, train/label/0.npy, ...; or Cityscapes' leftImg8bit/ and gtFine/)")
    return layout.open(root, tasks, split, size)


def _chosen(layout, tasks):
    """The layout's records for ``tasks`` (letters or names; None: all), with an error naming stray ones."""
    names = None if tasks is None else [task_names.NAMES[letter] for letter in task_names.letters(tasks)]
    known = [r.name for r in layout.records()]
    stray = [name for name in names or () if name not in known]
    if stray:
        raise ValueError(f"tasks: {layout.name} has the tasks {', '.join(known)}, not {', '.join(stray)}")
    return layout.records(names)


def _check_split_and_size(split, size):
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, got {split!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE):
        raise ValueError(f"size must be None or an integer >= {MIN_SIZE}, got {size!r}")


def _labels(path, array, shape, classes):
    """(int64 labels with 0 where unlabelled, bool [1, H, W] labelled) from labels with −1 for unlabelled."""
    if array.shape != shape:
        raise ValueError(f"{path}: labels must be [H, W] = {list(shape)} like the image, got {list(array.shape)}")
    labels = torch.from_numpy(np.ascontiguousarray(array)).double()
    if not torch.isfinite(labels).all() or (labels != labels.round()).any() or labels.max() >= classes \
            or labels.min() < -1:
        raise ValueError(f"{path}: labels must be whole numbers from 0 to {classes - 1}, or -1 for unlabelled "
                         f"pixels (got {float(labels.min()):g} … {float(labels.max()):g})")
    return labels.clamp_min(0).long(), (labels >= 0)[None]


def _resized(size, image, targets, masks):
    """The sample at height ``size`` (width in proportion, a multiple of 32): the image bilinearly, targets and
    masks by nearest neighbour."""
    height = size
    width = max(WIDTH_MULTIPLE, round(image.shape[2] * height / image.shape[1] / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    if (height, width) == tuple(image.shape[1:]):
        return image, targets, masks
    image = F.interpolate(image[None], (height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0, 1)

    def nearest(tensor):
        return F.interpolate(tensor[None].float(), (height, width), mode="nearest")[0].to(tensor.dtype)

    targets = {n: nearest(t[None])[0] if t.dim() == 2 else nearest(t) for n, t in targets.items()}
    masks = {n: nearest(m) for n, m in masks.items()}
    return image, targets, masks


def _count(folder):
    """n for a folder holding 0.npy … (n−1).npy; an error naming the first gap."""
    numbers = sorted(int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit())
    if numbers != list(range(len(numbers))):
        missing = next(i for i, n in enumerate(numbers + [None]) if n != i)
        raise ValueError(f"{folder}: files must be 0.npy … {len(numbers) - 1}.npy; {missing}.npy is missing")
    return len(numbers)


class BenchmarkDataset(Dataset):
    """One split of a NYUv2 / Cityscapes root in the preprocessed layout (see the module docstring)."""

    def __init__(self, root, tasks=None, split="train", size=None, layout=None):
        self.root = Path(root)
        self.layout = layout or find_layout(self.root)
        if not isinstance(self.layout, Layout):
            raise FileNotFoundError(f"{root} is not a NYUv2 or Cityscapes root in the preprocessed layout "
                                    f"(train/image/0.npy, train/label/0.npy, train/depth/0.npy, ...)")
        _check_split_and_size(split, size)
        self.records = _chosen(self.layout, tasks)
        self.split, self.size = split, size
        base = self.root / SPLIT_FOLDERS[split]
        self.folders = {"image": base / "image"}
        for name in (r.name for r in self.records):
            found = [base / f for f in self.layout.folders[name] if (base / f).is_dir()]
            if not found:
                raise FileNotFoundError(f"{base}: no {' or '.join(self.layout.folders[name])} folder for {name}")
            self.folders[name] = found[0]
        counts = {name: _count(folder) for name, folder in self.folders.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{base}: the folders hold different numbers of files: "
                             + ", ".join(f"{f.name} {counts[n]}" for n, f in self.folders.items()))
        self.length = counts["image"]
        self.class_names = self.layout.class_names

    def __len__(self):
        return self.length

    def _load(self, name, index):
        path = self.folders[name] / f"{index}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        if not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
            raise ValueError(f"{path}: expected numbers, got dtype {array.dtype}")
        return path, array

    def _image(self, index):
        path, array = self._load("image", index)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{path}: an image must be [H, W, 3], got {list(array.shape)}")
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float()
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{path}: pixels must be finite and in [0, 1] (got {float(image.min()):g} … "
                             f"{float(image.max()):g}); scale 0–255 images by 1/255")
        return image

    def _target(self, name, index, shape):
        path, array = self._load(name, index)
        if name == "segment_semantic":
            return _labels(path, array, shape, len(self.class_names))
        channels = 3 if name == "normal" else 1
        if array.ndim == 2 and channels == 1:
            array = array[..., None]
        if array.shape != (*shape, channels):
            raise ValueError(f"{path}: {name} must be [H, W, {channels}] with H, W = {list(shape)}, got "
                             f"{list(array.shape)}")
        values = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float()
        if not torch.isfinite(values).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values (unknown pixels must be 0)")
        valid = (values > 0) if name == "depth_zbuffer" else (values != 0).any(0, keepdim=True)
        return values.masked_fill(~valid.expand_as(values), 0.0), valid

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        image = self._image(index)
        targets, masks = {}, {}
        for record in self.records:
            targets[record.name], masks[record.name] = self._target(record.name, index, tuple(image.shape[1:]))
        return (image, targets, masks) if self.size is None else _resized(self.size, image, targets, masks)


# Cityscapes label id (0..33) -> its category among CITYSCAPES_CLASSES, -1 for the void ids 0..6.
CITYSCAPES_ID_CATEGORY = np.array([-1] * 7 + [0] * 4 + [1] * 6 + [2] * 4 + [3] * 2 + [4] + [5] * 2 + [6] * 8)


class CityscapesOfficial:
    """The official Cityscapes release (``leftImg8bit/``, ``gtFine/``, optional ``disparity/``): the 7 categories
    and, when the disparity maps are there, depth (as disparity)."""

    name = "cityscapes_official"
    class_names = CITYSCAPES_CLASSES

    def records(self, names=None):
        makers = {"segment_semantic": lambda: SegmentationTask("segment_semantic", len(self.class_names)),
                  "depth_zbuffer": lambda: DepthTask("depth_zbuffer")}
        return [make() for name, make in makers.items() if names is None or name in names]

    def detect(self, root):
        return (Path(root) / "leftImg8bit" / "train").is_dir() and (Path(root) / "gtFine" / "train").is_dir()

    def open(self, root, tasks=None, split="train", size=None):
        return CityscapesFolders(root, tasks, split, size, layout=self)


LAYOUTS.register("cityscapes_official")(CityscapesOfficial())


class CityscapesFolders(Dataset):
    """One split of the official Cityscapes release (see the module docstring); ``test`` reads ``val`` (the
    official test labels are not public)."""

    def __init__(self, root, tasks=None, split="train", size=None, layout=None):
        self.root, self.layout = Path(root), layout or CityscapesOfficial()
        _check_split_and_size(split, size)
        self.records = _chosen(self.layout, tasks)
        self.split, self.size = split, size
        self.class_names = self.layout.class_names
        folder = self.root / "leftImg8bit" / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        self.images = sorted(folder.glob("*/*_leftImg8bit.png"))
        names = [r.name for r in self.records]
        if "depth_zbuffer" in names and not (self.root / "disparity").is_dir():
            raise FileNotFoundError(f"{self.root}: no disparity/ folder for depth; download disparity_trainvaltest "
                                    f"or leave depth out (--tasks s)")

    def __len__(self):
        return len(self.images)

    def _companion(self, image, folder, suffix):
        stem = image.name[:-len("_leftImg8bit.png")]
        path = self.root / folder / image.parent.parent.name / image.parent.name / f"{stem}_{suffix}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the companion of {image})")
        return path

    @staticmethod
    def _read(path, mode=None):
        try:
            with Image.open(path) as picture:
                return np.asarray(picture.convert(mode) if mode else picture)
        except OSError as error:
            raise ValueError(f"{path}: not a readable PNG ({error})") from None

    def __getitem__(self, index):
        if not 0 <= index < len(self.images):
            raise IndexError(f"index {index} out of range for {len(self.images)} samples")
        path = self.images[index]
        image = torch.from_numpy(np.ascontiguousarray(self._read(path, "RGB").transpose(2, 0, 1))).float() / 255
        shape = tuple(image.shape[1:])
        targets, masks = {}, {}
        for record in self.records:
            if record.name == "segment_semantic":
                label_path = self._companion(path, "gtFine", "gtFine_labelIds")
                ids = self._read(label_path).astype(np.int64)
                if ids.ndim != 2 or ids.min() < 0 or ids.max() >= len(CITYSCAPES_ID_CATEGORY):
                    raise ValueError(f"{label_path}: expected label ids 0..33 in one channel")
                targets[record.name], masks[record.name] = _labels(label_path, CITYSCAPES_ID_CATEGORY[ids], shape,
                                                                   len(self.class_names))
            else:
                disparity_path = self._companion(path, "disparity", "disparity")
                raw = self._read(disparity_path).astype(np.float32)
                if raw.shape != shape:
                    raise ValueError(f"{disparity_path}: {list(raw.shape)} does not match the image's {list(shape)}")
                valid = torch.from_numpy(raw > 0)[None]
                targets[record.name] = torch.from_numpy(np.where(raw > 0, (raw - 1) / 256, 0).astype(np.float32))[None]
                masks[record.name] = valid
        return (image, targets, masks) if self.size is None else _resized(self.size, image, targets, masks)
