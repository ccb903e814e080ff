"""Taskonomy on disk (real or synthetic) as a torch Dataset.

Layouts:
- flat (MTRobust): ``root/{domain}/point_P_view_V_domain_{tag}.png``, one building; the source renamed
  the segmentation folder to ``segmentsemantic``, so that name is accepted too.
- omnidata: ``root/{domain}/taskonomy/{building}/point_P_view_V_domain_{tag}.png``.

Splits: the official CSVs (header ``id,train,val,test``, one building per row flagged 0/1, any line ending),
or the source's point-id threshold (point < threshold -> train, else val; no test set).

Unlike the source, every file is checked: a missing file, a PNG that is truncated or unreadable, or a PNG
with the wrong bit depth or colour type raises an error naming the file. Nothing is zero-filled (the source
silently used all-zero labels for missing segmentation files). Paths are joined, never made by replacing
"rgb" in a string (the source broke on roots containing "rgb").
"""
import os
import re
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mtrobust_fast.data import refuse_unfinished
from mtrobust_fast.tasks import DEPTH_INVALID_FROM, FORMAT_NAMES, image_array, resolve

SPLITS = ("train", "val", "test", "all")
SOURCE_POINT_THRESHOLD = 1200  # MTRobust's hard-coded train/val boundary on point ids
VALIDITY_DOMAINS = ("mask_valid", "depth_euclidean")  # geometry validity, in order of preference
RGB_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_FORMATS = {(8, 0): "gray8", (8, 2): "rgb8", (16, 0): "gray16"}
PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


class TaskonomyFileError(ValueError):
    """A Taskonomy file exists but is not what it should be (corrupt, truncated, wrong format or values)."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


class SampleId(NamedTuple):
    building: str  # "" in the flat layout
    point: int
    view: int


def read_png(path, formats):
    """Pixels of a PNG that must be in one of ``formats`` (keys of tasks.FORMAT_NAMES).

    The header's bit depth and colour type are checked before decoding, and the file must end with the IEND
    chunk, so a truncated file fails even where Pillow is set to load truncated images.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"missing Taskonomy file {path}") from None
    except IsADirectoryError:
        raise TaskonomyFileError(path, "is a directory, not a PNG file") from None
    except OSError as error:  # a symbolic-link loop, a permission problem, ...
        raise TaskonomyFileError(path, f"cannot be opened ({error.strerror or error})") from None
    with handle:
        head = handle.read(33)
        if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise TaskonomyFileError(path, "not a PNG file")
        bits, colour = head[24], head[25]
        if PNG_FORMATS.get((bits, colour)) not in formats:
            wanted = " or ".join(FORMAT_NAMES[f] for f in formats)
            found = f"{bits}-bit {PNG_COLOUR_TYPES.get(colour, f'colour type {colour}')}"
            raise TaskonomyFileError(path, f"expected a PNG in {wanted}, found {found}")
        handle.seek(-len(PNG_END), os.SEEK_END)
        if handle.read() != PNG_END:
            raise TaskonomyFileError(path, "truncated or corrupt PNG (it does not end with an IEND chunk)")
        handle.seek(0)
        try:
            with Image.open(handle) as image:
                image.load()
                return image_array(image)
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as error:
            raise TaskonomyFileError(path, f"unreadable PNG ({error})") from error


MIN_SIDE = 8  # smaller images are refused: no model here sees anything in them


def read_split_csv(path):
    """Official split CSV -> {"train": [...], "val": [...], "test": [...]} building names. A building in more than
    one split (a leak of training images into evaluation) or listed twice is refused.

    Accepts LF, CRLF and bare CR line endings (omnidata's copy uses CR) and a UTF-8 byte-order mark.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaskonomyFileError(path, f"not a UTF-8 text file (byte {error.start}: {error.reason})") from None
    except IsADirectoryError:
        raise TaskonomyFileError(path, "is a directory, not a split CSV") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or [cell.strip().lower() for cell in lines[0][1].split(",")] != ["id", "train", "val", "test"]:
        raise TaskonomyFileError(path, "split CSV must start with the header 'id,train,val,test'")
    splits = {"train": [], "val": [], "test": []}
    seen = {}  # building -> the line that listed it
    for number, line in lines[1:]:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != 4 or not cells[0] or any(flag not in ("0", "1") for flag in cells[1:]):
            raise TaskonomyFileError(path, f"line {number}: expected 'building,0|1,0|1,0|1', got {line!r}")
        if cells[1:].count("1") > 1:  # a building in two splits leaks its images from training into evaluation
            raise TaskonomyFileError(path, f"line {number}: building {cells[0]!r} is in more than one split")
        if cells[0] in seen:
            raise TaskonomyFileError(path, f"line {number}: building {cells[0]!r} is listed again (first on line "
                                           f"{seen[cells[0]]})")
        seen[cells[0]] = number
        for split, flag in zip(splits, cells[1:]):
            if flag == "1":
                splits[split].append(cells[0])
    return splits


def _nearest(x, size):
    """Nearest-neighbour resize of [..., H, W] (pixel-centre sampling); exact for labels and bool masks."""
    height, width = x.shape[-2:]
    rows = ((torch.arange(size) + 0.5) * height / size).long().clamp_max(height - 1)
    cols = ((torch.arange(size) + 0.5) * width / size).long().clamp_max(width - 1)
    return x[..., rows[:, None], cols[None, :]]


def _bilinear(x, size):
    """Bilinear resize of float [C,H,W], antialiased when shrinking."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _resize_masked(target, mask, resized_mask, size):
    """Bilinear (antialiased) resize of a float target that averages valid pixels only, so invalid codes never
    leak into valid ones; 0 where the resized mask is False."""
    if bool(mask.all()):
        return _bilinear(target, size).masked_fill(~resized_mask, 0)
    weight = mask.to(target.dtype)
    total = _bilinear(target * weight, size)
    count = _bilinear(weight, size)
    return torch.where(resized_mask, total / count.clamp_min(1e-6), 0.0)


class TaskonomyDataset(Dataset):
    """Taskonomy samples: ``ds[i] = (image, targets, masks)``.

    image: float32 [3,S,S] in [0,1]. targets[name]: float32 [C,S,S] (int64 [S,S] labels for segment_semantic).
    masks[name]: bool [1,S,S]. Keys are task names. The default collate stacks these dicts.

    Resizing to ``size`` (None keeps the files' size): the image bilinear with antialias; labels and masks
    nearest neighbour; continuous targets bilinear with antialias over valid pixels only. Masks are computed
    from the raw values first (the source resized masks bilinearly and labels bicubically).

    Geometric tasks (see tasks.Task) are also masked with the sample's geometry validity: omnidata's
    ``mask_valid`` (> 0) if that folder exists, else depth_euclidean < 64500 if that folder exists (what the
    source did for n, r, K, E, p), else only the task's own invalid code; ``validity_domain`` says which.

    Split selection: ``point_threshold`` (point < threshold -> train, else val) if given; otherwise the split
    CSV (``split_csv``, or the single ``train_val_test_*.csv`` in root); in the flat layout the source's
    threshold 1200 by default. ``split="all"`` takes every sample. ``buildings`` (omnidata) restricts the
    buildings further; CSV buildings absent from disk are skipped (a subset download is normal).
    """

    def __init__(self, root, tasks, split="train", size=256, layout="auto", split_csv=None, buildings=None,
                 point_threshold=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Taskonomy root {self.root} is not a directory")
        refuse_unfinished(self.root)
        self.tasks = resolve(tasks)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None, got {size!r}")
        self.split = split
        self.size = size
        self.layout = self._detect_layout() if layout == "auto" else layout
        if self.layout not in ("flat", "omnidata"):
            raise ValueError(f"layout must be 'auto', 'flat' or 'omnidata', got {layout!r}")
        self.folders = {"rgb": self._domain_dir("rgb")}
        for task in self.tasks:
            self.folders[task.folder] = self._domain_dir(task.folder, task)
        self.validity_domain = None
        if any(task.geometric for task in self.tasks):
            self.validity_domain = next((d for d in VALIDITY_DOMAINS if self._domain_dir(d, optional=True)), None)
            if self.validity_domain:
                self.folders[self.validity_domain] = self._domain_dir(self.validity_domain)
        self.samples = self._index(split_csv, buildings, point_threshold)

    # ---- layout and index ----

    def _detect_layout(self):
        rgb = self.root / "rgb"
        if (rgb / "taskonomy").is_dir():
            return "omnidata"
        if rgb.is_dir():
            with os.scandir(rgb) as entries:
                if any(RGB_NAME.match(entry.name) for entry in entries):
                    return "flat"
        raise FileNotFoundError(f"cannot find Taskonomy rgb files under {self.root}: expected "
                                f"rgb/taskonomy/{{building}}/point_P_view_V_domain_rgb.png (omnidata) or "
                                f"rgb/point_P_view_V_domain_rgb.png (flat)")

    def _domain_dir(self, domain, task=None, optional=False):
        names = [domain, "segmentsemantic"] if self.layout == "flat" and domain == "segment_semantic" else [domain]
        paths = [self.root / name / "taskonomy" if self.layout == "omnidata" else self.root / name for name in names]
        found = next((path for path in paths if path.is_dir()), None)
        if found is None and not optional:
            user = f" for task {task.name!r}" if task is not None else ""
            raise FileNotFoundError(f"missing Taskonomy domain folder{user}: {paths[0]} ({self.layout} layout)")
        return found

    def _index(self, split_csv, buildings, point_threshold):
        if split_csv is not None and point_threshold is not None:
            raise ValueError("give split_csv or point_threshold, not both")
        if self.layout == "flat":
            if split_csv is not None or buildings is not None:
                raise ValueError("the flat layout holds one building: split_csv and buildings apply only to "
                                 "the omnidata layout")
            threshold = SOURCE_POINT_THRESHOLD if point_threshold is None else point_threshold
            samples = self._scan("", self.folders["rgb"])
            return self._by_threshold(samples, threshold)
        with os.scandir(self.folders["rgb"]) as entries:
            on_disk = sorted(entry.name for entry in entries if entry.is_dir())
        chosen = on_disk
        if buildings is not None:
            buildings = [buildings] if isinstance(buildings, str) else list(buildings)
            absent = sorted(set(buildings) - set(on_disk))
            if absent:
                raise FileNotFoundError(f"buildings not found under {self.folders['rgb']}: {', '.join(absent)}")
            chosen = sorted(set(buildings))
        if point_threshold is None and self.split != "all":
            csv = self._split_csv(split_csv)
            listed = set(read_split_csv(csv)[self.split])
            chosen = [building for building in chosen if building in listed]
        samples = [sample for building in chosen for sample in self._scan(building, self.folders["rgb"] / building)]
        if point_threshold is not None:
            return self._by_threshold(samples, point_threshold)
        return self._nonempty(samples)

    def _split_csv(self, split_csv):
        if split_csv is not None:
            if not Path(split_csv).is_file():
                raise FileNotFoundError(f"split CSV {split_csv} not found")
            return Path(split_csv)
        found = sorted(self.root.glob("train_val_test_*.csv"))
        if len(found) == 1:
            return found[0]
        problem = "several split CSVs (" + ", ".join(p.name for p in found) + ")" if found else "no split CSV"
        raise ValueError(f"{problem} in {self.root}: pass split_csv=, point_threshold=, or split='all'")

    def _by_threshold(self, samples, threshold):
        if self.split == "test":
            raise ValueError("the point-id threshold split has only train and val")
        if self.split != "all":
            samples = [s for s in samples if (s.point < threshold) == (self.split == "train")]
        return self._nonempty(samples)

    def _nonempty(self, samples):
        if not samples:
            raise ValueError(f"no {self.split} samples found under {self.root} ({self.layout} layout)")
        return samples

    @staticmethod
    def _scan(building, folder):
        """Sample ids of one rgb folder, sorted by (point, view); one directory listing, no stat calls."""
        with os.scandir(folder) as entries:
            matches = [RGB_NAME.match(entry.name) for entry in entries]
        return sorted(SampleId(building, int(m.group(1)), int(m.group(2))) for m in matches if m)

    # ---- items ----

    def file_path(self, sample, folder, tag):
        """The file of one domain for a sample id."""
        directory = self.folders[folder] / sample.building if self.layout == "omnidata" else self.folders[folder]
        return directory / f"point_{sample.point}_view_{sample.view}_domain_{tag}.png"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        cache = {}

        def pixels(folder, tag, formats):
            if folder not in cache:
                cache[folder] = read_png(self.file_path(sample, folder, tag), formats)
            return cache[folder]

        rgb = pixels("rgb", "rgb", ("rgb8",))
        height, width = rgb.shape[:2]
        if height != width or height < MIN_SIDE:  # resizing would distort it, or there is nothing to see
            raise TaskonomyFileError(self.file_path(sample, "rgb", "rgb"), f"is {width}x{height} px; Taskonomy images "
                                                                          f"are square, at least {MIN_SIDE} px")
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255)
        valid = self._geometry_validity(pixels) if self.validity_domain else None
        targets, masks = {}, {}
        for task in self.tasks:
            raw = pixels(task.folder, task.tag, task.formats)
            if raw.shape[:2] != (height, width):  # a label of another image would be resized onto this one
                raise TaskonomyFileError(self.file_path(sample, task.folder, task.tag),
                                         f"is {raw.shape[1]}x{raw.shape[0]} px but its image is {width}x{height}")
            try:
                target, mask = task.decode(raw, valid if task.geometric else None)
            except ValueError as error:
                raise TaskonomyFileError(self.file_path(sample, task.folder, task.tag), str(error)) from error
            targets[task.name], masks[task.name] = self._resize(target, mask)
        if self.size is not None and image.shape[-2:] != (self.size, self.size):
            image = _bilinear(image, self.size)
        return image, targets, masks

    def _geometry_validity(self, pixels):
        if self.validity_domain == "mask_valid":
            return pixels("mask_valid", "mask_valid", ("gray8",)) > 0
        return pixels("depth_euclidean", "depth_euclidean", ("gray16",)) < DEPTH_INVALID_FROM

    def _resize(self, target, mask):
        if self.size is None or target.shape[-2:] == (self.size, self.size):
            return target, mask
        resized_mask = _nearest(mask, self.size)
        if not target.is_floating_point():
            return _nearest(target, self.size), resized_mask
        return _resize_masked(target, mask, resized_mask, self.size), resized_mask
