"""Damaged or foreign files give one line naming the file, never a traceback: a text file or a state dict of
non-tensors given as a checkpoint, an object set whose objects.json is not an object or lacks keys, a labels.csv
without its label column, with short rows or not in UTF-8."""
import csv
import json
import shutil

import pytest
import torch

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.classification import ObjectDataset
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.models import build_model, load_checkpoint, save_checkpoint


def test_files_that_are_not_checkpoints_are_named(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hello\n")
    path = save_checkpoint(tmp_path / "ok.pt", build_model("d", "resnet18", input_size=32), epoch=0)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: 1.0 for k in payload["state_dict"]}
    torch.save(payload, tmp_path / "floats.pt")
    with pytest.raises(ValueError, match=r"text.pt cannot be read as a checkpoint \(torch.load weights_only failed: "):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(ValueError, match=r"floats.pt is a damaged checkpoint: its state_dict entry '.*' is a float"):
        load_checkpoint(tmp_path / "floats.pt")
    assert cli_main(["attack", "--checkpoint", str(tmp_path / "text.pt"), "--data", str(tmp_path)]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def objects_set(tmp_path_factory):
    return synthesize_objects(tmp_path_factory.mktemp("objects") / "set", 20, size=16, seed=0, workers=1,
                              progress=False)


def _copy(objects_set, tmp_path):
    return shutil.copytree(objects_set, tmp_path / "copy")


@pytest.mark.parametrize("meta, message", [(["a"], "must hold a JSON object, not a list"),
                                           ({"format": None}, "lacks 'classes', 'mean', 'std'")])
def test_a_damaged_objects_json_is_named(objects_set, tmp_path, meta, message):
    root = _copy(objects_set, tmp_path)
    if isinstance(meta, dict):
        meta = {**{k: v for k, v in json.loads((root / "objects.json").read_text()).items()
                   if k not in ("classes", "mean", "std")}}
    (root / "objects.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        ObjectDataset(root, "train")


def _rewrite_labels(root, change):
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    (root / "labels.csv").write_bytes(change(rows))


@pytest.mark.parametrize("change, message", [
    (lambda rows: "\n".join(",".join(c for i, c in enumerate(r) if i != rows[0].index("label")) for r in rows)
     .encode(), "has no column 'label'"),
    (lambda rows: "\n".join(",".join(r if i != 1 else r[:1]) for i, r in enumerate(rows)).encode(),
     "a row has fewer fields than the header"),
    (lambda rows: "\n".join(",".join(r) for r in rows).replace("file", "fil\xe9", 1).encode("latin-1"),
     "is not UTF-8 text"),
])
def test_a_damaged_labels_csv_is_named(objects_set, tmp_path, change, message):
    root = _copy(objects_set, tmp_path)
    _rewrite_labels(root, change)
    with pytest.raises(ValueError, match=r"labels.csv.*" + message):
        for split in ("train", "val", "test"):
            ObjectDataset(root, split)


def test_an_object_image_of_another_size_is_named_unless_a_size_is_given(objects_set, tmp_path):
    from PIL import Image
    root = _copy(objects_set, tmp_path)
    data = ObjectDataset(root, "train")
    name = data.files[0]
    with Image.open(root / "rgb" / name) as png:
        png.resize((24, 24)).save(root / "rgb" / name)
    with pytest.raises(ValueError, match=r"rgb/.* is 24x24 px but the set's images are 16 px; give a size"):
        ObjectDataset(root, "train")[0]
    assert ObjectDataset(root, "train", size=16)[0][0].shape == (3, 16, 16)
