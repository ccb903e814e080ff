"""Classification data and models: the synthetic object set, the CIFAR binary reader, classifiers, the class head."""
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrobust_fast.tasks.classification import ClassificationTask, bce_one_hot
from mtrobust_fast.data import open_dataset
from mtrobust_fast.data.classification import CifarDataset, ObjectDataset, is_classification_data, read_cifar_file
from mtrobust_fast.data.synth.objects import CLASSES, synthesize_objects
from mtrobust_fast.models import build_classifier, load_checkpoint, save_checkpoint


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_object_set_is_deterministic_balanced_and_reads_back(tmp_path):
    one = synthesize_objects(tmp_path / "one", 60, size=16, seed=3, workers=1, progress=False)
    two = synthesize_objects(tmp_path / "two", 60, size=16, seed=3, workers=2, progress=False)
    assert _digest(one) == _digest(two)
    other = synthesize_objects(tmp_path / "other", 60, size=16, seed=4, workers=1, progress=False)
    assert _digest(one) != _digest(other)
    with open(one / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "val", "test"):
        labels = [int(r["label"]) for r in rows if r["split"] == split]
        assert labels and sorted(labels) == sorted(list(range(len(CLASSES))) * (len(labels) // len(CLASSES)))
    meta = json.loads((one / "objects.json").read_text())
    assert meta["classes"] == list(CLASSES) and len(meta["mean"]) == 3 and all(0 < s < 1 for s in meta["std"])
    train = ObjectDataset(one, "train")
    image, targets, masks = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert int(targets["class"]) == int(rows[0]["label"]) and masks == {}
    assert ObjectDataset(one, "val", size=32)[0][0].shape == (3, 32, 32)
    depth = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(one / "depth" / rows[0]["file"]))
    assert depth.dtype in (np.uint16, np.int32) and (depth < 65535).mean() > 0.9  # the object and the room


def test_object_set_refuses_to_overwrite_and_bad_arguments(tmp_path):
    synthesize_objects(tmp_path, 10, size=8, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_objects(tmp_path, 10, size=8, workers=1, progress=False)
    for bad in ({"images": 0}, {"size": 4}, {"seed": -1}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            synthesize_objects(tmp_path / "x", **{"images": 10, "size": 8, **bad})


def _write_cifar10(folder, per_file=7, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels.reshape(per_file, -1)], axis=1)
        records.tofile(folder / name)
        written[name] = (labels, pixels)
    return written


def test_cifar10_binary_reader_round_trips(tmp_path):
    written = _write_cifar10(tmp_path / "cifar-10-batches-bin")
    assert is_classification_data(tmp_path)
    train, val, test = (CifarDataset(tmp_path, split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 3, 7) and train.classes == 10
    labels = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    pixels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    image, targets, _ = val[1]
    assert int(targets["class"]) == labels[33]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(pixels[33]))  # channel-first planes
    image, targets, _ = test[6]
    assert int(targets["class"]) == written["test_batch.bin"][0][6]
    expected = pixels[:32].transpose(0, 2, 3, 1).reshape(-1, 3) / 255.0
    assert np.allclose(train.normalization["mean"], expected.mean(0), atol=1e-6)


def test_cifar100_reader_keeps_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    for name, count in (("train.bin", 20), ("test.bin", 5)):
        header = np.stack([rng.integers(0, 20, count), rng.integers(0, 100, count)], axis=1).astype(np.uint8)
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        np.concatenate([header, pixels], axis=1).tofile(tmp_path / name)
        if name == "test.bin":
            expected = header
    test = CifarDataset(tmp_path, "test")
    assert test.classes == 100 and list(test.labels) == list(expected[:, 1]) and list(test.coarse) == list(expected[:, 0])


def test_cifar_reader_names_damaged_files(tmp_path):
    written = _write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(ValueError, match="data_batch_3.bin.*truncated"):
        CifarDataset(tmp_path, "train")
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.bin"):
        CifarDataset(tmp_path, "train")
    bad = np.concatenate([np.full((1, 1), 12, np.uint8), np.zeros((1, 3072), np.uint8)], axis=1)
    bad.tofile(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="label 12"):
        read_cifar_file(tmp_path / "bad.bin", 10)
    assert written and not is_classification_data(tmp_path / "nothing")


def test_classifier_stem_normalisation_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=10, input_size=32,
                             normalization={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]})
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18
    assert model.encoder.stem[0][0].kernel_size == (3, 3) and model.encoder.stem[0][0].stride == (1, 1)
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)
    model.eval()
    path = save_checkpoint(tmp_path / "clf.pt", model, epoch=1)
    loaded, meta = load_checkpoint(path)
    assert torch.equal(loaded(x)["class"], model(x)["class"]) and loaded.task_records["class"].classes == 10
    with pytest.raises(ValueError, match="no stem"):
        build_classifier("xception_small", classes=10, input_size=32)
    assert build_classifier("resnet18", classes=3, input_size=96).config["encoder_kwargs"] == {}


def test_open_dataset_checks_the_class_count(tmp_path):
    _write_cifar10(tmp_path)
    model = build_classifier("resnet18", classes=100, input_size=32)
    with pytest.raises(ValueError, match="10 class labels but the model.s .class. head has 100"):
        open_dataset(tmp_path, model)


def test_classification_losses_keep_float64_and_match_torch():
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (5,))
    head = ClassificationTask("class", 4)
    assert head.loss(logits, labels).dtype == torch.float64
    assert head.with_loss("dlr").loss(logits.half(), labels).dtype == torch.float32
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nn.functional.one_hot(labels, 4).double(), reduction="none").mean(1)
    assert torch.allclose(bce_one_hot(logits, labels), expected)
    stats = head.metric_stats(logits, labels) + head.metric_stats(logits, labels)
    assert head.metric_scores(stats)["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    with pytest.raises(ValueError, match="3 classes"):
        ClassificationTask("class", 2, "dlr")


def test_domain_labels_come_from_the_data(tmp_path):
    written = _write_cifar10(tmp_path / "c10")
    test = CifarDataset(tmp_path / "c10", "test", domain=True)
    labels = written["test_batch.bin"][0]
    expected = [0 if label in (0, 1, 8, 9) else 1 for label in labels]
    assert [int(test[i][1]["domain"]) for i in range(len(test))] == expected and test.domain_classes == 2
    assert "domain" not in CifarDataset(tmp_path / "c10", "test")[0][1]
    objects_root = synthesize_objects(tmp_path / "objects", 30, size=8, workers=1, progress=False)
    train = ObjectDataset(objects_root, "train", domain=True)
    for i in range(len(train)):
        _, targets, _ = train[i]
        wall = train.class_names[int(targets["class"])] not in ("chair", "table", "plant", "ball")
        assert int(targets["domain"]) == int(wall)


def test_a_classifier_with_a_domain_head_round_trips(tmp_path):
    model = build_classifier("resnet18", classes=10, input_size=16, domain_classes=20)
    assert model.evaluated_task_names == ["class", "domain"]
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.task_records["domain"].classes == 20 and loaded(torch.rand(1, 3, 16, 16))["domain"].shape == (1, 20)


def test_stl10_binary_reader_round_trips(tmp_path):
    from mtrobust_fast.data.classification import Stl10Dataset

    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", 10), ("test", 3)):
        pixels = rng.integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)
        labels = rng.integers(1, 11, count, dtype=np.uint8)
        planes = np.stack([[pixels[n, :, :, c].T for c in range(3)] for n in range(count)])  # column-major planes
        planes.tofile(tmp_path / f"{split}_X.bin")
        labels.tofile(tmp_path / f"{split}_y.bin")
        written[split] = (pixels, labels)
    assert is_classification_data(tmp_path)
    train, val, test = (Stl10Dataset(tmp_path, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (9, 1, 3)
    image, targets, _ = test[2]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(written["test"][0][2]).permute(2, 0, 1))
    assert int(targets["class"]) == written["test"][1][2] - 1
    (tmp_path / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="1 labels for 3 images"):
        Stl10Dataset(tmp_path, "test")


def test_image_folder_reader(tmp_path):
    from PIL import Image

    from mtrobust_fast.data.classification import ImageFolderDataset, open_classification

    rng = np.random.default_rng(1)
    for split, per_class in (("train", 3), ("val", 1), ("test", 1)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                side = int(rng.integers(20, 40))
                Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.png")
    assert is_classification_data(tmp_path)
    with pytest.raises(ValueError, match="give --size"):
        open_classification(tmp_path, "train")
    train = ImageFolderDataset(tmp_path, "train", size=16)
    assert train.class_names == ["cat", "dog"] and len(train) == 6 and len(ImageFolderDataset(tmp_path, "val", 16)) == 2
    image, targets, _ = train[4]
    assert image.shape == (3, 16, 16) and int(targets["class"]) == 1
    assert len(train.normalization["mean"]) == 3
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird"):
        ImageFolderDataset(tmp_path, "val", 16)


def test_object_labels_whose_paths_leave_the_set_are_refused(tmp_path):
    root = synthesize_objects(tmp_path / "set", 20, size=16, seed=0, workers=1, progress=False)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["file"] = "../../../etc/hostname"
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"labels.csv: the path '../../../etc/hostname' leaves the dataset's folder"):
        ObjectDataset(root, rows[0]["split"])
