"""NYUv2 / Cityscapes: the .npy-layout reader, the benchmark metrics against numpy, Δp, the LibMTL model and its
state-dict import against a forward pass written here, and train → attack → sweep → report on the synthetic
NYUv2-layout data."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from mtrobust_fast.analysis.delta_p import delta_p
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.benchmarks import BenchmarkDataset, find_layout, open_benchmark
from mtrobust_fast.data.synth.nyuv2 import synthesize_nyuv2
from mtrobust_fast.models import build_dense_model, load_checkpoint, read_checkpoint
from mtrobust_fast.models.libmtl import convert
from mtrobust_fast.tasks.benchmarks import DepthTask, NormalTask, SegmentationTask


def _unit(rng, shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_layout(root, folders=("image", "label", "depth", "normal"), n=(3, 2), shape=(16, 24), classes=13, seed=0):
    """Files as the MTAN/LibMTL release holds them: float32 images [H,W,3] in [0,1], float labels [H,W] with -1,
    depth [H,W,1] with 0 unknown, unit normals [H,W,3] with zero vectors unknown."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), n):
        for folder in folders:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arrays = {"image": rng.random((*shape, 3), dtype=np.float32),
                      "label": rng.integers(-1, classes, shape).astype(np.float32),
                      "depth": np.where(rng.random((*shape, 1)) < 0.2, 0, rng.random((*shape, 1)) * 5 + 0.5),
                      "normal": np.where(rng.random((*shape, 1)) < 0.1, 0, _unit(rng, (*shape, 3)))}
            for folder in folders:
                key = "label" if folder.startswith("label") else folder
                np.save(root / split / folder / f"{i}.npy", arrays[key].astype(np.float32))
    return root


# ---- reader ----

def test_reader_round_trips_the_files_with_masks_and_ignore_labels(tmp_path):
    root = write_layout(tmp_path)
    assert find_layout(root).name == "nyuv2"
    data = BenchmarkDataset(root, None, "train")
    assert len(data) == 3 and [r.name for r in data.records] == ["segment_semantic", "depth_zbuffer", "normal"]
    image, targets, masks = data[1]
    label = np.load(root / "train/label/1.npy")
    depth = np.load(root / "train/depth/1.npy")[..., 0]
    normal = np.load(root / "train/normal/1.npy")
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(np.load(root / "train/image/1.npy")).permute(2, 0, 1))
    assert targets["segment_semantic"].dtype == torch.int64 and targets["segment_semantic"].shape == (16, 24)
    assert torch.equal(masks["segment_semantic"][0], torch.from_numpy(label >= 0))
    assert torch.equal(targets["segment_semantic"], torch.from_numpy(np.maximum(label, 0)).long())
    assert torch.equal(masks["depth_zbuffer"][0], torch.from_numpy(depth > 0))
    assert torch.allclose(targets["depth_zbuffer"][0], torch.from_numpy(depth))
    assert torch.equal(masks["normal"][0], torch.from_numpy((normal != 0).any(-1)))
    assert masks["normal"].shape == (1, 16, 24) and targets["normal"].shape == (3, 16, 24)
    # NYUv2 has no test split: test reads val, as the papers report on it
    assert len(BenchmarkDataset(root, "sd", "test")) == 2
    assert [r.name for r in BenchmarkDataset(root, "sd", "val").records] == ["segment_semantic", "depth_zbuffer"]


def test_cityscapes_layout_with_mtan_folder_names_and_resizing(tmp_path):
    root = write_layout(tmp_path, folders=("image", "label_7", "depth"), classes=7, shape=(16, 64))
    assert find_layout(root).name == "cityscapes"
    data = BenchmarkDataset(root, None, "val", size=8)
    image, targets, masks = data[0]  # the width follows in proportion, a multiple of 32
    assert image.shape == (3, 8, 32) and targets["depth_zbuffer"].shape == (1, 8, 32)
    assert targets["segment_semantic"].shape == (8, 32) and masks["segment_semantic"].shape == (1, 8, 32)
    assert data.records[0].classes == 7
    with pytest.raises(ValueError, match="cityscapes has the tasks"):
        BenchmarkDataset(root, "sn", "train")


def write_cityscapes(root, shape=(16, 32), seed=0):
    """The official release's files: RGB PNGs, one-channel label-id PNGs (ids 0..33), 16-bit disparity PNGs."""
    rng = np.random.default_rng(seed)
    for split, cities in (("train", ("aachen", "bonn")), ("val", ("lindau",))):
        for city in cities:
            for folder in ("leftImg8bit", "gtFine", "disparity"):
                (root / folder / split / city).mkdir(parents=True)
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(rng.integers(0, 34, shape, dtype=np.uint8)).save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                disparity = np.where(rng.random(shape) < 0.2, 0, rng.integers(1, 30000, shape)).astype(np.uint16)
                Image.fromarray(disparity).save(root / "disparity" / split / city / f"{stem}_disparity.png")
    return root


def test_official_cityscapes_layout_reads_categories_and_disparity(tmp_path):
    root = write_cityscapes(tmp_path)
    assert find_layout(root).name == "cityscapes_official"
    data = open_benchmark(root, None, "train")
    assert len(data) == 4 and [r.classes for r in data.records[:1]] == [7]
    image, targets, masks = data[2]  # bonn's first image (sorted by city)
    stem = "bonn_000000_000019"
    ids = np.asarray(Image.open(root / "gtFine/train/bonn" / f"{stem}_gtFine_labelIds.png")).astype(int)
    disparity = np.asarray(Image.open(root / "disparity/train/bonn" / f"{stem}_disparity.png")).astype(np.float32)
    # the categories by hand: void 0-6, flat 7-10, construction 11-16, object 17-20, nature 21-22, sky 23,
    # human 24-25, vehicle 26-33
    bounds = [7, 11, 17, 21, 23, 24, 26, 34]
    category = np.searchsorted(bounds, ids, side="right") - 1
    assert torch.equal(masks["segment_semantic"][0], torch.from_numpy(ids >= 7))
    assert torch.equal(targets["segment_semantic"], torch.from_numpy(np.maximum(category, 0)))
    assert torch.equal(masks["depth_zbuffer"][0], torch.from_numpy(disparity > 0))
    assert torch.allclose(targets["depth_zbuffer"][0], torch.from_numpy(np.where(disparity > 0, (disparity - 1) / 256, 0)))
    assert image.shape == (3, 16, 32) and float(image.max()) <= 1
    small = open_benchmark(root, "s", "test", size=32)[0]  # test reads val
    assert small[0].shape == (3, 32, 64) and list(small[1]) == ["segment_semantic"]
    (root / "disparity/val/lindau/lindau_000001_000019_disparity.png").unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000001_000019_disparity.png: missing"):
        open_benchmark(root, None, "val")[1]


@pytest.mark.parametrize("damage, message", [
    (lambda r: np.save(r / "train/image/0.npy", np.full((16, 24, 3), 200, np.float32)), "scale 0–255"),
    (lambda r: np.save(r / "train/label/0.npy", np.full((16, 24), 13, np.float32)), "from 0 to 12"),
    (lambda r: np.save(r / "train/label/0.npy", np.zeros((8, 24), np.float32)), "like the image"),
    (lambda r: np.save(r / "train/normal/0.npy", np.full((16, 24, 3), np.nan, np.float32)), "NaN"),
    (lambda r: (r / "train/depth/0.npy").write_text("not an array"), "not a readable .npy"),
])
def test_bad_files_are_named(tmp_path, damage, message):
    root = write_layout(tmp_path)
    damage(root)
    with pytest.raises(ValueError, match=message) as error:
        BenchmarkDataset(root, None, "train")[0]
    assert "0.npy" in str(error.value)


def test_gaps_and_uneven_folders_are_refused(tmp_path):
    root = write_layout(tmp_path)
    (root / "train/depth/2.npy").unlink()
    with pytest.raises(ValueError, match="different numbers of files"):
        BenchmarkDataset(root, None, "train")
    (root / "train/depth/1.npy").rename(root / "train/depth/2.npy")
    with pytest.raises(ValueError, match="1.npy is missing"):
        BenchmarkDataset(root, None, "train")


# ---- metrics against numpy ----

def test_segmentation_metrics_equal_a_numpy_confusion_matrix():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(4, 5, 12, 10)))
    labels = torch.from_numpy(rng.integers(0, 5, (4, 12, 10)))
    mask = torch.from_numpy(rng.random((4, 1, 12, 10)) > 0.2)
    task = SegmentationTask(classes=5)
    scores = task.metric_scores(task.metric_stats(logits, labels, mask))
    pred, gt, valid = logits.argmax(1).numpy(), labels.numpy(), mask[:, 0].numpy()
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (gt[valid], pred[valid]), 1)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert scores["miou"] == pytest.approx(iou.mean())  # every class occurs: LibMTL's mean over all classes
    assert scores["pixel_acc"] == pytest.approx(np.trace(confusion) / confusion.sum())
    loss = task.loss(logits, labels, mask)
    ce = F.cross_entropy(logits, labels, reduction="none").numpy()
    expected = [(ce[i][valid[i]]).mean() for i in range(4)]
    assert loss.tolist() == pytest.approx(expected)


def test_depth_metrics_equal_numpy():
    rng = np.random.default_rng(2)
    target = np.where(rng.random((3, 1, 8, 8)) < 0.3, 0.0, rng.random((3, 1, 8, 8)) * 4 + 0.5)
    output = rng.normal(size=(3, 1, 8, 8)) + 2
    mask = torch.from_numpy(target > 0)
    task = DepthTask()
    scores = task.metric_scores(task.metric_stats(torch.from_numpy(output), torch.from_numpy(target), mask))
    valid = target > 0
    assert scores["abs_err"] == pytest.approx(np.abs(output - target)[valid].mean())
    assert scores["rel_err"] == pytest.approx((np.abs(output - target)[valid] / target[valid]).mean())
    errors = task.error(torch.from_numpy(output), torch.from_numpy(target), mask)
    assert errors.tolist() == pytest.approx([np.abs(output - target)[i][valid[i]].mean() for i in range(3)])


def test_normal_angle_statistics_equal_numpy():
    rng = np.random.default_rng(3)
    target = _unit(rng, (2, 16, 16, 3)).transpose(0, 3, 1, 2)
    output = 3 * target + rng.normal(size=target.shape) * 1.5  # unnormalised predictions near the target
    valid = rng.random((2, 1, 16, 16)) > 0.25
    task = NormalTask()
    stats = task.metric_stats(torch.from_numpy(output), torch.from_numpy(target), torch.from_numpy(valid))
    scores = task.metric_scores(stats)
    unit = output / np.linalg.norm(output, axis=1, keepdims=True)
    angles = np.degrees(np.arccos(np.clip((unit * target).sum(1), -1, 1)))[valid[:, 0]]
    assert scores["mean"] == pytest.approx(angles.mean())
    assert abs(scores["median"] - np.median(angles)) <= 0.005 + 1e-9
    for threshold in (11.25, 22.5, 30):
        assert scores[f"within_{threshold:g}"] == pytest.approx((angles < threshold).mean())
    loss = task.loss(torch.from_numpy(output), torch.from_numpy(target), torch.from_numpy(valid))
    cos = (unit * target).sum(1)
    assert loss.tolist() == pytest.approx([(1 - cos[i][valid[i, 0]]).mean() for i in range(2)])


def test_delta_p_by_hand():
    directions = {"A": {"m1": True, "m2": False}, "B": {"m": True}}
    base = {"A": {"m1": 96, "m2": 98}, "B": {"m": 0.2}}
    new = {"A": {"m1": 93, "m2": 99}, "B": {"m": 0.5}}
    a = ((93 - 96) / 96 + (98 - 99) / 98) / 2
    b = (0.5 - 0.2) / 0.2
    assert delta_p(new, base, directions) == pytest.approx(100 * (a + b) / 2)
    assert delta_p(base, base, directions) == 0
    zero = {"A": {"m1": 0, "m2": 98}, "B": {"m": 0.2}}
    with pytest.raises(ValueError, match="non-zero baseline"):
        delta_p(new, zero, directions)
    assert delta_p(new, zero, directions, skip_undefined=True) == pytest.approx(100 * ((98 - 99) / 98 + b) / 2)


# ---- the LibMTL model, written here from LibMTL's description, and its import ----

class _TorchvisionBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _LibMTLEncoder(nn.Module):
    """A torchvision ResNet-50 trunk, then LibMTL's dilation pass over layer3 (2) and layer4 (4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            layer = [_TorchvisionBottleneck(inplanes, planes, stride, down)]
            layer += [_TorchvisionBottleneck(planes * 4, planes, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            inplanes = planes * 4
        for layer, dilate in ((self.layer3, 2), (self.layer4, 4)):
            for m in layer.modules():
                if isinstance(m, nn.Conv2d):
                    if m.stride == (2, 2):
                        m.stride = (1, 1)
                        if m.kernel_size == (3, 3):
                            m.dilation, m.padding = (dilate // 2,) * 2, (dilate // 2,) * 2
                    elif m.kernel_size == (3, 3):
                        m.dilation, m.padding = (dilate,) * 2, (dilate,) * 2

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _cbr(cin, cout, k, d=1):
    return [nn.Conv2d(cin, cout, k, padding=d if k == 3 else 0, dilation=d, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class _Pool(nn.Sequential):
    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _ASPP(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(*_cbr(cin, 256, 1))] + [nn.Sequential(*_cbr(cin, 256, 3, r))
                                                                          for r in (12, 24, 36)]
                                   + [_Pool(nn.AdaptiveAvgPool2d(1), *_cbr(cin, 256, 1))])
        self.project = nn.Sequential(*_cbr(1280, 256, 1), nn.Dropout(0.5))

    def forward(self, x):
        return self.project(torch.cat([c(x) for c in self.convs], 1))


class _LibMTLModel(nn.Module):
    """What LibMTL's trainer wraps for NYUv2: ``encoder`` and ``decoders`` (a ModuleDict of DeepLab heads)."""

    def __init__(self, outputs):
        super().__init__()
        self.encoder = _LibMTLEncoder()
        self.decoders = nn.ModuleDict({t: nn.Sequential(_ASPP(2048), *_cbr(256, 256, 3), nn.Conv2d(256, c, 1))
                                       for t, c in outputs.items()})

    def forward(self, x):
        rep = self.encoder(x)
        return {t: F.interpolate(d(rep), size=x.shape[-2:], mode="bilinear", align_corners=True)
                for t, d in self.decoders.items()}


@pytest.fixture(scope="module")
def libmtl_file(tmp_path_factory):
    torch.manual_seed(0)
    model = _LibMTLModel({"segmentation": 13, "depth": 1, "normal": 3})
    for m in model.modules():  # non-trivial BatchNorm statistics, so that eval mode is really compared
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    state["loss_scale"] = torch.zeros(3)  # what an uncertainty-weighting run keeps in the model
    path = tmp_path_factory.mktemp("libmtl") / "best.pt"
    torch.save(state, path)
    return path, model.eval()


def test_imported_libmtl_state_dict_gives_the_outputs_of_its_forward_pass(libmtl_file, tmp_path):
    path, reference = libmtl_file
    ours, meta = load_checkpoint(path)  # accepted directly, converted on the fly
    assert meta["benchmark"] == "nyuv2" and meta["dropped_keys"] == ["loss_scale"]
    assert ours.config["tasks"] == "sdn" and ours.config["encoder"] == "resnet50_dilated"
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    for libmtl_name, name in (("segmentation", "segment_semantic"), ("depth", "depth_zbuffer"), ("normal", "normal")):
        assert torch.allclose(got[name], expected[libmtl_name], atol=1e-5, rtol=1e-4), name
    out = tmp_path / "imported.pt"
    assert cli_main(["import-checkpoint", str(path), "--out", str(out)]) == 0
    assert read_checkpoint(out)["config"] == ours.config


def test_libmtl_state_dicts_that_do_not_fit_are_named(libmtl_file, tmp_path):
    path, _ = libmtl_file
    state = torch.load(path, weights_only=True)
    bad = dict(state, **{"decoders.depth.4.weight": torch.zeros(2, 256, 1, 1)})
    with pytest.raises(ValueError, match="decoders.depth_zbuffer.4.weight has shape"):
        convert(bad)
    extra = dict(state, **{"encoder.fc.weight": torch.zeros(10, 2048)})
    with pytest.raises(ValueError, match="unexpected.*encoder.fc.weight"):
        convert(extra)
    other = {("decoders.edges." + k.split(".", 2)[2] if k.startswith("decoders.depth.") else k): v
             for k, v in state.items()}
    with pytest.raises(ValueError, match="decoders for \\['edges'\\]"):
        convert(other)
    integer = dict(state, **{"encoder.conv1.weight": state["encoder.conv1.weight"].long()})
    with pytest.raises(ValueError, match="not as floating point"):
        convert(integer)


def test_libmtl_parameter_count_is_resnet50s():
    model = build_dense_model([SegmentationTask(classes=13)], "resnet50_dilated", input_size=32)
    assert sum(p.numel() for p in model.encoder.parameters()) == 23_508_032  # torchvision ResNet-50 without fc


# ---- everything runs on the synthetic NYUv2 layout ----

@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    return synthesize_nyuv2(tmp_path_factory.mktemp("nyu"), 12, size=32, seed=0, workers=1, progress=False,
                            preset="large")


def test_synthetic_layout_is_read_as_nyuv2(nyu):
    data = BenchmarkDataset(nyu, None, "train")
    assert find_layout(nyu).name == "nyuv2" and len(data) + len(BenchmarkDataset(nyu, None, "val")) == 12
    image, targets, masks = data[0]
    assert image.shape == (3, 32, 32) and 0 <= float(image.min()) and float(image.max()) <= 1
    labels = targets["segment_semantic"][masks["segment_semantic"][0]]
    assert labels.min() >= 0 and labels.max() <= 12
    normals = targets["normal"][:, masks["normal"][0]]
    assert torch.allclose(normals.norm(dim=0), torch.ones(normals.shape[1]), atol=1e-4)


def test_train_attack_sweep_report_on_nyuv2_layout(nyu, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(nyu), "--out", str(run), "--encoder", "resnet18_cpu", "--epochs", "1",
                     "--batch-size", "4", "--no-progress", "--adversarial", "madry", "--steps", "1",
                     "--eps", "2/255"]) == 0
    printed = capsys.readouterr().out
    assert "segment_semantic majority class" in printed and "normal training mean" in printed
    model, _ = load_checkpoint(run / "best.pt")
    assert model.config["kind"] == "dense" and set(model.task_records) == {"segment_semantic", "depth_zbuffer",
                                                                           "normal"}
    assert isinstance(model.task_records["normal"], NormalTask)
    assert cli_main(["analyze", "delta-p", "--model", str(run / "best.pt"), "--baselines", str(run / "best.pt")]) == 0
    assert "delta_p +0.00 %" in capsys.readouterr().out
    for attack in ("pgd", "wgd", "ensemble"):
        assert cli_main(["attack", "--checkpoint", str(run / "best.pt"), "--data", str(nyu), "--attack", attack,
                         "--steps", "2", "--target", "sdn,n", "--limit", "4", "--batch-size", "4", "--no-progress",
                         "--out", str(tmp_path / attack)]) == 0
    printed = capsys.readouterr().out
    assert "within_11.25" in printed or "n " in printed
    config = tmp_path / "sweep.yaml"
    config.write_text(f"data: {nyu}\nmodels:\n  - {run / 'best.pt'}\n  - {{train: {{tasks: sd, encoder: resnet18_cpu, "
                      f"epochs: 1, batch_size: 4}}, name: sd}}\nattacks: [pgd]\nsteps: [1]\neps: [2/255]\n"
                      f"sets: subsets\nlimit: 4\nbatch_size: 4\n")
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    rows = pd.read_parquet(out / "results.parquet")
    assert set(rows["attacked"]) >= {"s", "d", "n", "sd", "sn", "dn", "sdn"}
    assert set(rows["task"]) == {"segment_semantic", "depth_zbuffer", "normal"}
    assert rows["adv_error"].notna().all() and all(math.isfinite(v) for v in rows["adv_error"])
    assert cli_main(["report", str(out / "results.parquet"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "summary.md").exists()


def test_images_the_encoder_cannot_take_are_refused_before_training(tmp_path, capsys):
    root = write_layout(tmp_path / "nyu", shape=(16, 24))
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--encoder", "resnet18",
                     "--epochs", "1", "--no-progress"]) == 2
    assert "size: the images are 16x24 px" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--encoder", "resnet18_cpu",
                     "--epochs", "1", "--no-progress"]) == 2
    assert "not a multiple of the resnet18_cpu encoder's stride 16" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()
