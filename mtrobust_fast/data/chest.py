"""Chest X-ray datasets from their metadata CSV and image files: CheXpert and NIH ChestX-ray14.

Multi-label: each image has one binary label per finding, and the ``"class"`` target is a float [K] vector with a
mask [K] of the labels that are known. Images are read as grayscale [1, S, S] in [0, 1] (models for them take one
channel). With ``domain=True`` the targets also hold ``"sex"`` (1 = female, a one-label head) and ``"age"`` (years
/ 100, a regression head), masked where the CSV does not give them.

- **CheXpert** (``train.csv`` and ``valid.csv`` with columns ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and one
  column per finding): 1 is positive, 0 negative; -1 (uncertain) and blank (not mentioned) are masked, never
  folded into negatives. ``Path`` is relative to the dataset folder or to its parent (the distribution's own
  paths start with the folder name).
- **NIH** (``Data_Entry_2017*.csv`` with ``Image Index, Finding Labels, Patient ID, Patient Age, Patient Gender``):
  the labels are the findings named in ``Finding Labels`` (``|``-separated; "No Finding" means none), all known;
  images are found under ``images/`` (or the folder itself).

Splits are by patient, so no patient is in two splits: CheXpert's "test" is ``valid.csv`` and its "train"/"val"
divide ``train.csv``; NIH's "test" is the patients of ``test_list.txt`` when present, and every other split
divides the rest. The division puts a patient in "val" when a stable hash of its id falls in the last tenth.
"""
import csv
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtrobust_fast.tasks.classification import MultiLabelTask, RegressionTask
from mtrobust_fast.data.images import read_resized
from mtrobust_fast.data.readers import DOMAIN, FINDINGS, READERS
from mtrobust_fast.files import contained

SPLITS = ("train", "val", "test")
CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
VAL_BUCKETS = 10  # a patient goes to "val" when crc32(id) % 10 == 9
AGE_SCALE = 100.0
NORMALIZATION_SAMPLE = 256


def chest_format(root):
    """"chexpert", "nih" or None: which chest X-ray layout ``root`` holds."""
    root = Path(root)
    if (root / "train.csv").is_file() and _header(root / "train.csv")[:1] == ["Path"]:
        return "chexpert"
    if _nih_csv(root) is not None:
        return "nih"
    return None


def _header(path):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return []


def _nih_csv(root):
    found = sorted(Path(root).glob("Data_Entry_2017*.csv"))
    return found[0] if found else None


def _rows(path):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from None


def _in_val(patient):
    return zlib.crc32(patient.encode()) % VAL_BUCKETS == VAL_BUCKETS - 1


def _age(text, where):
    if text in ("", None):
        return None
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"{where}: age {text!r} is not a number") from None
    if not 0 <= age < 150:
        raise ValueError(f"{where}: age {age} is out of range")
    return age


def _sex(text):
    return {"female": 1.0, "f": 1.0, "male": 0.0, "m": 0.0}.get((text or "").strip().lower())


@READERS.register("chest")
class ChestXrayDataset(Dataset):
    """A CheXpert or NIH folder as ``(image [1, S, S], targets, masks)``; ``findings`` chooses and orders the
    labels (default: all of the format's)."""

    priority = 1
    settings = (DOMAIN, FINDINGS)

    @staticmethod
    def detect(root):
        return chest_format(root) is not None

    @classmethod
    def open(cls, root, split, size, domain=False, findings=None):
        return cls(root, split, size, domain, findings)

    classes = None
    domain_classes = None
    input_channels = 1

    def __init__(self, root, split="train", size=None, domain=False, findings=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size is None:
            raise ValueError("size: chest X-rays come in different sizes; give --size")
        self.root, self.size, self.domain = Path(root), size, domain
        self.format = chest_format(root)
        if self.format is None:
            raise FileNotFoundError(f"{root} holds no CheXpert train.csv or NIH Data_Entry_2017.csv")
        known = CHEXPERT_FINDINGS if self.format == "chexpert" else NIH_FINDINGS
        self.findings = tuple(findings or known)
        unknown = [f for f in self.findings if f not in known]
        if unknown:
            raise ValueError(f"findings {unknown} are not {self.format} columns; choose from {', '.join(known)}")
        self.records = self._chexpert(split) if self.format == "chexpert" else self._nih(split)
        self.main_task = MultiLabelTask("class", len(self.findings), self.findings)
        self.domain_tasks = [MultiLabelTask("sex", 1, ("female",)), RegressionTask("age")] if domain else []
        self._normalization = None

    # ---- reading the metadata ----

    def _image_path(self, relative):
        for base in (self.root, self.root.parent):
            if (base / relative).is_file():
                return base / relative
        return self.root / relative  # missing: reported with its path when read

    def _chexpert(self, split):
        csv_path = self.root / ("valid.csv" if split == "test" else "train.csv")
        if not csv_path.is_file():
            raise FileNotFoundError(f"missing CheXpert file {csv_path}")
        rows = _rows(csv_path)
        missing = [c for c in ("Path",) + self.findings if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {missing}")
        records = []
        for line, row in enumerate(rows, start=2):
            where = f"{csv_path}:{line}"
            parts = contained(row["Path"], where).parts
            patient = next((p for p in parts if p.startswith("patient")), row["Path"])
            if split != "test" and _in_val(patient) != (split == "val"):
                continue
            labels, known = [], []
            for finding in self.findings:
                value = (row.get(finding) or "").strip()
                if value in ("", "-1", "-1.0"):
                    labels.append(0.0)
                    known.append(False)
                elif value in ("1", "1.0", "0", "0.0"):
                    labels.append(float(value))
                    known.append(True)
                else:
                    raise ValueError(f"{where}: {finding} is {value!r}; CheXpert labels are 1, 0, -1 or blank")
            records.append((self._image_path(row["Path"]), labels, known, _sex(row.get("Sex")),
                            _age(row.get("Age"), where)))
        return records

    def _nih(self, split):
        csv_path = _nih_csv(self.root)
        rows = _rows(csv_path)
        needed = ("Image Index", "Finding Labels", "Patient ID")
        missing = [c for c in needed if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {missing}")
        test_list = self.root / "test_list.txt"
        test_images = set(test_list.read_text().split()) if test_list.is_file() else None
        test_patients = {row["Patient ID"] for row in rows if test_images and row["Image Index"] in test_images}
        images = self.root / "images" if (self.root / "images").is_dir() else self.root
        records = []
        for line, row in enumerate(rows, start=2):
            where = f"{csv_path}:{line}"
            patient = row["Patient ID"]
            if test_images is not None:
                chosen = (patient in test_patients) == (split == "test") and \
                    (split == "test" or _in_val(patient) == (split == "val"))
            else:  # no official test list: a second hash bucket is the test split
                bucket = zlib.crc32(patient.encode()) % VAL_BUCKETS
                chosen = {"test": bucket == VAL_BUCKETS - 2, "val": bucket == VAL_BUCKETS - 1,
                          "train": bucket < VAL_BUCKETS - 2}[split]
            if not chosen:
                continue
            named = {f.strip() for f in row["Finding Labels"].split("|")} - {"No Finding", ""}
            stray = named - set(NIH_FINDINGS)
            if stray:
                raise ValueError(f"{where}: unknown finding(s) {sorted(stray)}")
            labels = [float(f in named) for f in self.findings]
            records.append((images / contained(row["Image Index"], csv_path), labels, [True] * len(labels),
                            _sex(row.get("Patient Gender")), _age(row.get("Patient Age"), where)))
        return records

    # ---- images ----

    def _pixels(self, path):
        return read_resized(path, self.size, "L")

    @property
    def normalization(self):
        """Mean and std of this split's pixels (one channel), from up to 256 images (the trainer reads the training
        split's)."""
        if self._normalization is None:
            records = self.records
            if not records:
                raise ValueError(f"{self.root}: the split holds no images")
            step = max(1, len(records) // NORMALIZATION_SAMPLE)
            pixels = np.stack([self._pixels(r[0]) for r in records[::step][:NORMALIZATION_SAMPLE]]) / 255.0
            self._normalization = {"mean": [float(pixels.mean())], "std": [float(max(pixels.std(), 1e-3))]}
        return self._normalization

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        path, labels, known, sex, age = self.records[index]
        image = torch.from_numpy(self._pixels(path).copy()).float()[None] / 255.0
        targets = {"class": torch.tensor(labels)}
        masks = {"class": torch.tensor(known)}
        if self.domain:
            targets["sex"] = torch.tensor([0.0 if sex is None else sex])
            masks["sex"] = torch.tensor([sex is not None])
            targets["age"] = torch.tensor(0.0 if age is None else age / AGE_SCALE)
            masks["age"] = torch.tensor(age is not None)
        return image, targets, masks
