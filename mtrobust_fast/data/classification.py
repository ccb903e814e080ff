"""Image-classification datasets: the synthetic object set, CIFAR-10/100 and STL-10 in their binary
distribution formats, and image folders (``root/<split>/<class>/<image>``: ImageNet-R, ROBIN/OOD-CV); chest
X-ray sets (multi-label, one channel) are in :mod:`mtrobust_fast.data.chest`.

Both yield ``(image, {"class": label}, {})`` with float32 [3, S, S] images in [0, 1], like the Taskonomy
dataset's ``(image, targets, masks)`` (the object set adds ``"depth"`` maps and masks with ``depth=True``); with ``domain=True`` the targets also hold ``"domain"``, a coarser label
from domain knowledge: CIFAR-100's 20 superclasses, CIFAR-10's vehicle (0: airplane, automobile, ship, truck)
vs animal (1), or the object set's free-standing (0) vs against-a-wall (1) furniture. ``normalization`` is the training split's per-channel pixel mean and std
(classifiers normalise their inputs with it).

CIFAR binary format (the ``*-bin`` archives, never pickles): CIFAR-10 records are 1 label byte + 3072 pixel
bytes (1024 red, 1024 green, 1024 blue, rows top to bottom) in ``data_batch_1.bin`` … ``data_batch_5.bin`` and
``test_batch.bin``; CIFAR-100 records are 1 coarse-label byte + 1 fine-label byte + 3072 pixel bytes in
``train.bin`` and ``test.bin``. The folder may hold the files directly or in ``cifar-10-batches-bin`` /
``cifar-100-binary``. Splits: "train" is the training files less their last tenth, which is "val" (a fixed
hold-out, as the GAT code validated on held-out training images); "test" is the test file.
"""
import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mtrobust_fast.data import readers
from mtrobust_fast.data.synth import objects
from mtrobust_fast.data.readers import READERS
from mtrobust_fast.data.images import read_resized
from mtrobust_fast.files import contained
from mtrobust_fast.tasks import get_task

DEPTH = get_task("depth_zbuffer")  # the object set's depth files use Taskonomy's 16-bit z-depth encoding

SPLITS = ("train", "val", "test")
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"
CIFAR100_TRAIN, CIFAR100_TEST = "train.bin", "test.bin"
CIFAR_SUBFOLDERS = ("", "cifar-10-batches-bin", "cifar-100-binary")
PIXELS = 3 * 32 * 32
CIFAR10_VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck
VAL_FRACTION = 10  # the last 1/10 of the training records


def cifar_folder(root):
    """(folder, 10 or 100) of a CIFAR binary distribution under ``root``, or None."""
    root = Path(root)
    for sub in CIFAR_SUBFOLDERS:
        folder = root / sub if sub else root
        if (folder / CIFAR10_TRAIN[0]).is_file() or (folder / CIFAR10_TEST).is_file():
            return folder, 10
        if (folder / CIFAR100_TRAIN).is_file() or (folder / CIFAR100_TEST).is_file():
            return folder, 100
    return None


def read_cifar_file(path, variant):
    """(pixels uint8 [N, 32, 32, 3], fine labels int64 [N], coarse labels int64 [N] or None) of one binary file."""
    path = Path(path)
    header = 1 if variant == 10 else 2
    raw = np.fromfile(path, dtype=np.uint8)
    record = header + PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-{variant} records "
                         f"({record} bytes each); the file is truncated or not a CIFAR-{variant} binary file")
    rows = raw.reshape(-1, record)
    labels = rows[:, header - 1].astype(np.int64)
    classes = 10 if variant == 10 else 100
    if labels.max() >= classes:
        raise ValueError(f"{path}: label {int(labels.max())} is out of range for CIFAR-{variant} ({classes} classes)")
    coarse = rows[:, 0].astype(np.int64) if variant == 100 else None
    if coarse is not None and coarse.max() >= 20:
        raise ValueError(f"{path}: coarse label {int(coarse.max())} is out of range (20 superclasses)")
    pixels = rows[:, header:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), labels, coarse


def _hold_out(count, split):
    cut = count - max(1, count // VAL_FRACTION) if count > 1 else count
    return slice(0, cut) if split == "train" else slice(cut, count)


def _channel_stats(pixels):
    """Per-channel mean and std of uint8 pixels [N, H, W, 3], in [0, 1] units."""
    values = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    return {"mean": values.mean(0).round(6).tolist(), "std": np.maximum(values.std(0), 1e-6).round(6).tolist()}


@READERS.register("cifar")
class CifarDataset(Dataset):
    """CIFAR-10/100 from the binary distribution; labels are the fine classes (``coarse`` holds CIFAR-100's 20
    superclasses)."""

    priority = 2
    settings = (readers.DOMAIN,)

    @staticmethod
    def detect(root):
        return cifar_folder(root) is not None

    @classmethod
    def open(cls, root, split, size, domain=False):
        return cls(root, split, size, domain)

    def __init__(self, root, split="train", size=None, domain=False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        found = cifar_folder(root)
        if found is None:
            raise FileNotFoundError(f"{root} holds no CIFAR binary files ({CIFAR10_TRAIN[0]}, {CIFAR10_TEST}, "
                                    f"{CIFAR100_TRAIN} or {CIFAR100_TEST})")
        folder, self.variant = found
        self.classes = self.variant
        self._folder = folder
        self._train_files = CIFAR10_TRAIN if self.variant == 10 else (CIFAR100_TRAIN,)
        test_files = (CIFAR10_TEST if self.variant == 10 else CIFAR100_TEST,)
        pixels, labels, coarse = self._read(folder, test_files if split == "test" else self._train_files)
        chosen = slice(None) if split == "test" else _hold_out(len(labels), split)
        self.pixels, self.labels = pixels[chosen], labels[chosen]
        self.coarse = None if coarse is None else coarse[chosen]
        self.size = size
        self._normalization = None
        self.domain = None
        if domain:
            self.domain = self.coarse if self.coarse is not None else \
                (~np.isin(self.labels, CIFAR10_VEHICLES)).astype(np.int64)
        self.domain_classes = 20 if self.variant == 100 else 2

    @property
    def normalization(self):
        """Per-channel mean and std of the training split (read on first use)."""
        if self._normalization is None:
            pixels = self._read(self._folder, self._train_files)[0]
            self._normalization = _channel_stats(pixels[_hold_out(len(pixels), "train")])
        return self._normalization

    @staticmethod
    def _read(folder, names):
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing CIFAR file(s) {', '.join(missing)}")
        parts = [read_cifar_file(folder / n, 10 if n.startswith(("data_batch", "test_batch")) else 100)
                 for n in names]
        coarse = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), coarse

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = torch.from_numpy(self.pixels[index]).permute(2, 0, 1).float() / 255.0
        targets = {"class": torch.tensor(self.labels[index])}
        if self.domain is not None:
            targets["domain"] = torch.tensor(self.domain[index])
        return _resized(image, self.size), targets, {}


def _resized(image, size):
    if size is None or image.shape[-1] == size:
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


@READERS.register("objects")
class ObjectDataset(Dataset):
    """The synthetic object set written by :func:`mtrobust_fast.data.synth.objects.synthesize_objects`."""

    priority = 0
    settings = (readers.DOMAIN, readers.DEPTH)

    @staticmethod
    def detect(root):
        return (Path(root) / objects.META_JSON).is_file()

    @classmethod
    def open(cls, root, split, size, domain=False, depth=False):
        return cls(root, split, size, domain, depth)

    def __init__(self, root, split="train", size=None, domain=False, depth=False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.with_domain, self.with_depth = domain, depth
        self.domain_classes = 2
        meta_path = self.root / objects.META_JSON
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{meta_path} not found: {root} is not an object dataset") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path} is damaged: {error}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path} must hold a JSON object, not a {type(meta).__name__}")
        if meta.get("format") != objects.FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {objects.FORMAT!r}")
        missing = [key for key in ("classes", "mean", "std") if key not in meta]
        if missing:
            raise ValueError(f"{meta_path} lacks {', '.join(repr(k) for k in missing)}")
        self.class_names = list(meta["classes"])
        self.classes = len(self.class_names)
        self.normalization = {"mean": meta["mean"], "std": meta["std"]}
        self.size = size
        self.native = meta.get("size")  # every image's side when the set was made; checked when read unresized
        labels_path = self.root / objects.LABELS_CSV
        try:
            with open(labels_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [c for c in ("file", "label", "split") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{labels_path} has no column {', '.join(repr(c) for c in missing)}")
                rows = list(reader)
            if any(None in r.values() for r in rows):
                raise ValueError(f"{labels_path}: a row has fewer fields than the header")
            rows = [r for r in rows if r["split"] == split]
        except FileNotFoundError:
            raise FileNotFoundError(f"{labels_path} not found") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{labels_path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        self.files = [str(contained(r["file"], labels_path)) for r in rows]
        try:
            self.labels = [int(r["label"]) for r in rows]
        except ValueError:
            raise ValueError(f"{labels_path}: a label is not an integer") from None
        bad = [lab for lab in self.labels if not 0 <= lab < self.classes]
        if bad:
            raise ValueError(f"{labels_path}: label {bad[0]} is out of range for {self.classes} classes")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.root / "rgb" / self.files[index]
        try:
            with Image.open(path) as png:
                pixels = np.asarray(png.convert("RGB"))
        except (FileNotFoundError, OSError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        if self.size is None and isinstance(self.native, int) and image.shape[-2:] != (self.native, self.native):
            raise ValueError(f"{path} is {image.shape[-1]}x{image.shape[-2]} px but the set's images are "
                             f"{self.native} px; give a size (--size) to resize every image to one side")
        targets, masks = {"class": torch.tensor(self.labels[index])}, {}
        if self.with_domain:
            targets["domain"] = torch.tensor(int(self.class_names[self.labels[index]] not in objects.FREE_STANDING))
        if self.with_depth:
            targets["depth"], masks["depth"] = self._depth(self.files[index])
        return _resized(image, self.size), targets, masks

    def _depth(self, name):
        """The file's z-depth as Taskonomy's log depth [1, S, S] and its validity mask (nearest-neighbour resize)."""
        path = self.root / "depth" / name
        try:
            with Image.open(path) as png:
                target, mask = DEPTH.decode(png)
        except (FileNotFoundError, OSError, ValueError) as error:
            raise ValueError(f"cannot read depth {path}: {error}") from None
        if self.size is not None and target.shape[-1] != self.size:
            target = F.interpolate(target[None], size=(self.size, self.size), mode="nearest")[0]
            mask = F.interpolate(mask[None].float(), size=(self.size, self.size), mode="nearest")[0].bool()
        return target, mask


STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
STL10_SIDE = 96
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
NORMALIZATION_SAMPLE = 512  # image-folder training images read to estimate the pixel mean and std


def stl10_folder(root):
    """The folder of an STL-10 binary distribution under ``root`` (itself or ``stl10_binary``), or None."""
    for folder in (Path(root), Path(root) / "stl10_binary"):
        if (folder / STL10_FILES["train"][0]).is_file() or (folder / STL10_FILES["test"][0]).is_file():
            return folder
    return None


class _ArrayDataset(Dataset):
    """Images held as uint8 [N, H, W, 3] with labels [N]; "train" loses its last tenth to "val"."""

    domain_classes = None

    def __init__(self, pixels, labels, split, size):
        chosen = slice(None) if split == "test" else _hold_out(len(labels), split)
        self.pixels, self.labels, self.size = pixels[chosen], labels[chosen], size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = torch.from_numpy(self.pixels[index]).permute(2, 0, 1).float() / 255.0
        return _resized(image, self.size), {"class": torch.tensor(self.labels[index])}, {}


@READERS.register("stl10")
class Stl10Dataset(_ArrayDataset):
    """STL-10 from its binary distribution: ``train_X.bin``/``test_X.bin`` (uint8, 3×96×96 per image, each
    channel stored column by column) and ``train_y.bin``/``test_y.bin`` (labels 1…10); the unlabelled set is
    not read."""

    classes = 10
    priority = 3
    settings = ()

    @staticmethod
    def detect(root):
        return stl10_folder(root) is not None

    @classmethod
    def open(cls, root, split, size):
        return cls(root, split, size)

    def __init__(self, root, split="train", size=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = stl10_folder(root)
        if folder is None:
            raise FileNotFoundError(f"{root} holds no STL-10 binary files ({STL10_FILES['train'][0]}, ...)")
        images_name, labels_name = STL10_FILES["test" if split == "test" else "train"]
        pixels, labels = self.read(folder / images_name, folder / labels_name)
        self.normalization = _channel_stats(pixels[_hold_out(len(pixels), "train")]) if split != "test" else \
            _channel_stats(self.read(folder / STL10_FILES["train"][0], folder / STL10_FILES["train"][1])[0])
        super().__init__(pixels, labels, split, size)

    @staticmethod
    def read(images_path, labels_path):
        """(pixels uint8 [N, 96, 96, 3], labels int64 [N] in 0…9) of one image file and its label file."""
        for path in (images_path, labels_path):
            if not path.is_file():
                raise FileNotFoundError(f"missing STL-10 file {path}")
        raw = np.fromfile(images_path, dtype=np.uint8)
        record = 3 * STL10_SIDE * STL10_SIDE
        if raw.size == 0 or raw.size % record:
            raise ValueError(f"{images_path}: {raw.size} bytes is not a whole number of 3x96x96 images")
        labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1
        if len(labels) != raw.size // record:
            raise ValueError(f"{labels_path}: {len(labels)} labels for {raw.size // record} images")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{labels_path}: labels must be 1..10")
        pixels = raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 3, 2, 1)  # column-major planes
        return np.ascontiguousarray(pixels), labels


def image_folder(root):
    """Whether ``root`` is an image-folder layout: ``root/train/<class>/<image>`` (and val/, test/)."""
    train = Path(root) / "train"
    return train.is_dir() and any(d.is_dir() for d in train.iterdir())


@READERS.register("image_folder")
class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/<image>`` (ImageNet-R, ROBIN/OOD-CV style): classes are the sorted folder names
    of ``train/``, images are resized to ``size`` (required: the images' sizes differ), normalisation comes from
    up to 512 training images. A split folder that is missing is an error naming it."""

    domain_classes = None
    priority = 4
    settings = ()

    @staticmethod
    def detect(root):
        return image_folder(root)

    @classmethod
    def open(cls, root, split, size):
        return cls(root, split, size)

    def __init__(self, root, split="train", size=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size is None:
            raise ValueError("size: image folders hold images of different sizes; give --size")
        self.root, self.size = Path(root), size
        self.class_names = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        self.classes = len(self.class_names)
        if self.classes < 2:
            raise ValueError(f"{self.root / 'train'} must hold at least two class folders")
        self.samples = self._samples(split)
        self._normalization = None

    def _samples(self, split):
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        samples = []
        for label, name in enumerate(self.class_names):
            directory = folder / name
            if directory.is_dir():
                samples += [(path, label) for path in sorted(directory.iterdir())
                            if path.suffix.lower() in IMAGE_SUFFIXES]
        unknown = [d.name for d in folder.iterdir() if d.is_dir() and d.name not in self.class_names]
        if unknown:
            raise ValueError(f"{folder} has class folder(s) {unknown[:3]} that train/ does not have")
        return samples

    @property
    def normalization(self):
        if self._normalization is None:
            train = self._samples("train")
            step = max(1, len(train) // NORMALIZATION_SAMPLE)
            pixels = np.stack([self._pixels(path) for path, _ in train[::step][:NORMALIZATION_SAMPLE]])
            self._normalization = _channel_stats(pixels)
        return self._normalization

    def _pixels(self, path):
        return read_resized(path, self.size, "RGB")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = torch.from_numpy(self._pixels(path).copy()).permute(2, 0, 1).float() / 255.0
        return image, {"class": torch.tensor(label)}, {}


def is_classification_data(root):
    """Whether a registered classification reader detects its layout at ``root`` (else it is read as Taskonomy)."""
    return readers.find(root) is not None


def open_classification(root, split="train", size=None, domain=False, depth=False, findings=None):
    """The classification dataset at ``root`` (``domain``: with the domain labels; ``depth``: with the depth maps;
    ``findings``: the chest X-ray labels to read, in order), read by the reader that detects its layout."""
    return readers.open_split(root, split, size, domain=domain, depth=depth, findings=findings)
