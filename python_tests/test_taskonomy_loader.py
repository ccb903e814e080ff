"""TaskonomyDataset on PNGs written in the real Taskonomy encodings, in both layouts."""
import pickle
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from mtrobust_fast.data import taskonomy
from mtrobust_fast.data.taskonomy import TaskonomyDataset, TaskonomyFileError, read_png, read_split_csv
from mtrobust_fast.tasks import TASKS

ALL = "sdDnkKeEprA"
DOMAINS = [t.name for t in TASKS if t.letter != "A"]
SIDE = 16


def encode(domain, rng, hole):
    """Pixels of one domain in its Taskonomy encoding; ``hole`` marks pixels without geometry."""
    if domain == "rgb":
        return rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    if domain.startswith("depth"):
        return np.where(hole, 65535, rng.integers(500, 5000, (SIDE, SIDE))).astype(np.uint16)
    if domain in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
        return rng.integers(0, 10000, (SIDE, SIDE), dtype=np.uint16)
    if domain == "normal":
        return np.where(hole[..., None], 128, rng.integers(0, 256, (SIDE, SIDE, 3))).astype(np.uint8)
    if domain == "principal_curvature":
        rg = rng.integers(1, 256, (SIDE, SIDE, 2))
        return np.where(hole[..., None], 0, np.dstack([rg, np.zeros((SIDE, SIDE))])).astype(np.uint8)
    if domain == "reshading":
        return np.repeat(rng.integers(0, 256, (SIDE, SIDE, 1), dtype=np.uint8), 3, axis=2)
    if domain == "segment_semantic":
        return np.where(hole, 0, rng.integers(0, 18, (SIDE, SIDE))).astype(np.uint8)
    if domain == "mask_valid":
        return np.where(hole, 0, 255).astype(np.uint8)
    raise AssertionError(domain)


def file_name(point, view, domain):
    tag = "segmentsemantic" if domain == "segment_semantic" else domain
    return f"point_{point}_view_{view}_domain_{tag}.png"


def write_sample(root, point, view, building=None, domains=DOMAINS, mask_valid=False, seg_folder="segment_semantic"):
    """Writes every domain of one view; returns the raw arrays by domain."""
    rng = np.random.default_rng(zlib.crc32(f"{building}/{point}/{view}".encode()))
    hole = np.zeros((SIDE, SIDE), dtype=bool)
    hole[:4, :5] = True
    raws = {}
    for domain in ["rgb", *domains, *(["mask_valid"] if mask_valid else [])]:
        folder = seg_folder if domain == "segment_semantic" else domain
        directory = root / folder / "taskonomy" / building if building else root / folder
        directory.mkdir(parents=True, exist_ok=True)
        raws[domain] = encode(domain, rng, hole)
        Image.fromarray(raws[domain]).save(directory / file_name(point, view, domain))
    return raws


def write_csv(path, rows, newline="\n"):
    path.write_text(newline.join(["id,train,val,test", *rows]) + newline)


@pytest.fixture
def omni(tmp_path):
    """Omnidata layout: 3 buildings with 2 views each, official-style CSV with CR line endings."""
    for building in ("allensville", "collierville", "ihlen"):
        for point, view in ((3, 0), (1, 2)):
            write_sample(tmp_path, point, view, building)
    write_csv(tmp_path / "train_val_test_tiny.csv",
              ["allensville,1,0,0", "collierville,0,1,0", "ihlen,0,0,1", "beechwood,1,0,0"], newline="\r")
    return tmp_path


@pytest.fixture
def flat(tmp_path):
    """MTRobust flat layout: one building, points either side of the source's threshold 1200."""
    for point in (5, 1199, 1200, 4000):
        write_sample(tmp_path, point, 0)
    return tmp_path


# ---- layouts and splits ----

def test_omnidata_split_from_the_csv_in_root(omni):
    for split, building in (("train", "allensville"), ("val", "collierville"), ("test", "ihlen")):
        ds = TaskonomyDataset(omni, "sd", split=split, size=None)
        assert ds.layout == "omnidata"
        assert [tuple(s) for s in ds.samples] == [(building, 1, 2), (building, 3, 0)]  # sorted; beechwood absent
    assert len(TaskonomyDataset(omni, "s", split="all", size=None)) == 6


def test_buildings_restrict_and_must_exist(omni):
    ds = TaskonomyDataset(omni, "s", split="all", buildings=["ihlen", "allensville"], size=None)
    assert {s.building for s in ds.samples} == {"ihlen", "allensville"}
    with pytest.raises(ValueError, match="no train samples"):
        TaskonomyDataset(omni, "s", split="train", buildings=["ihlen"])
    with pytest.raises(FileNotFoundError, match="woodbine"):
        TaskonomyDataset(omni, "s", split="all", buildings=["woodbine"])


def test_csv_discovery_needs_exactly_one(omni):
    (omni / "train_val_test_tiny.csv").unlink()
    with pytest.raises(ValueError, match="no split CSV"):
        TaskonomyDataset(omni, "s")
    assert len(TaskonomyDataset(omni, "s", split="all")) == 6
    write_csv(omni / "train_val_test_a.csv", ["ihlen,1,0,0"])
    write_csv(omni / "train_val_test_b.csv", ["ihlen,0,1,0"])
    with pytest.raises(ValueError, match="several split CSVs"):
        TaskonomyDataset(omni, "s")
    assert len(TaskonomyDataset(omni, "s", split_csv=omni / "train_val_test_b.csv", split="val")) == 2
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TaskonomyDataset(omni, "s", split_csv=omni / "nope.csv")


def test_point_threshold_in_omnidata_layout(omni):
    ds = TaskonomyDataset(omni, "s", split="train", point_threshold=2, size=None)
    assert all(s.point == 1 for s in ds.samples) and len(ds) == 3
    with pytest.raises(ValueError, match="not both"):
        TaskonomyDataset(omni, "s", split_csv=omni / "train_val_test_tiny.csv", point_threshold=2)


def test_flat_layout_uses_the_source_threshold(flat):
    train = TaskonomyDataset(flat, "sdnE", size=None)
    assert train.layout == "flat" and [s.point for s in train.samples] == [5, 1199]
    assert [s.point for s in TaskonomyDataset(flat, "s", split="val").samples] == [1200, 4000]
    assert [s.point for s in TaskonomyDataset(flat, "s", split="train", point_threshold=1201).samples] == [5, 1199, 1200]
    assert len(TaskonomyDataset(flat, "s", split="all")) == 4
    with pytest.raises(ValueError, match="only train and val"):
        TaskonomyDataset(flat, "s", split="test")
    with pytest.raises(ValueError, match="omnidata"):
        TaskonomyDataset(flat, "s", buildings=["x"])


def test_flat_layout_accepts_the_renamed_segmentation_folder(tmp_path):
    raws = write_sample(tmp_path, 7, 1, seg_folder="segmentsemantic")
    _, targets, _ = TaskonomyDataset(tmp_path, "s", split="all", size=None)[0]
    assert targets["segment_semantic"].tolist() == raws["segment_semantic"].tolist()


def test_layout_detection_and_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TaskonomyDataset(tmp_path / "absent", "s")
    with pytest.raises(FileNotFoundError, match="rgb"):
        TaskonomyDataset(tmp_path, "s")
    write_sample(tmp_path, 1, 0)
    with pytest.raises(ValueError, match="split"):
        TaskonomyDataset(tmp_path, "s", split="validation")
    with pytest.raises(ValueError, match="size"):
        TaskonomyDataset(tmp_path, "s", size=0)
    with pytest.raises(ValueError, match="layout"):
        TaskonomyDataset(tmp_path, "s", layout="multimae")
    with pytest.raises(ValueError, match="'q'"):
        TaskonomyDataset(tmp_path, "sq")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_split_csv_line_endings_and_bom(tmp_path, newline):
    path = tmp_path / "train_val_test_x.csv"
    path.write_bytes(("\ufeffid,train,val,test" + newline + "a,1,0,0" + newline + newline + "b , 0,0,1" + newline)
                     .encode("utf-8"))
    assert read_split_csv(path) == {"train": ["a"], "val": [], "test": ["b"]}


def test_split_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train_val_test_bad.csv"
    path.write_text("building,point,view\na,1,2\n")
    with pytest.raises(TaskonomyFileError, match="train_val_test_bad.csv.*header"):
        read_split_csv(path)
    path.write_text("id,train,val,test\na,1,0,0\nb,yes,0,0\n")
    with pytest.raises(TaskonomyFileError, match="train_val_test_bad.csv: line 3"):
        read_split_csv(path)


def test_construction_reads_no_image(flat, monkeypatch):
    def refuse(*args):
        raise AssertionError("listing opened a file")
    monkeypatch.setattr(taskonomy, "read_png", refuse)
    assert len(TaskonomyDataset(flat, ALL, split="all")) == 4


# ---- items ----

def test_items_match_the_registry_decoding(omni):
    ds = TaskonomyDataset(omni, ALL, split="train", size=None)
    image, targets, masks = ds[1]
    raws = write_sample(omni, 3, 0, "allensville")  # rewrites the same deterministic pixels
    assert image.dtype == torch.float32 and image.shape == (3, SIDE, SIDE)
    assert torch.equal(image, torch.from_numpy(raws["rgb"]).permute(2, 0, 1).float() / 255)
    assert list(targets) == list(masks) == [t.name for t in ds.tasks]
    geometry = raws["depth_euclidean"] < 64500
    for task in ds.tasks:
        raw = raws["rgb"] if task.letter == "A" else raws[task.name]
        expected, expected_mask = task.decode(raw, geometry if task.geometric else None)
        assert torch.equal(targets[task.name], expected), task.name
        assert torch.equal(masks[task.name], expected_mask), task.name
        assert masks[task.name].dtype == torch.bool and masks[task.name].shape == (1, SIDE, SIDE)
        if task.letter != "s":
            assert targets[task.name].dtype == torch.float32
            assert targets[task.name].shape == (task.channels, SIDE, SIDE)
    assert targets["segment_semantic"].dtype == torch.int64
    assert torch.equal(targets["autoencoder"], image)
    assert ds.validity_domain == "depth_euclidean"
    hole = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    hole[:4, :5] = True
    for name in ("depth_zbuffer", "normal", "principal_curvature", "reshading", "keypoints3d", "edge_occlusion"):
        assert torch.equal(masks[name][0], ~hole), name
    for name in ("keypoints2d", "edge_texture", "autoencoder"):
        assert masks[name].all(), name


def test_geometry_validity_prefers_mask_valid(tmp_path):
    raws = write_sample(tmp_path, 1, 0, domains=["reshading", "depth_euclidean"], mask_valid=True)
    ds = TaskonomyDataset(tmp_path, "r", split="all", size=None)
    assert ds.validity_domain == "mask_valid"
    assert torch.equal(ds[0][2]["reshading"][0], torch.from_numpy(raws["mask_valid"] > 0))


def test_without_a_validity_source_only_own_codes_apply(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["reshading", "normal"])
    ds = TaskonomyDataset(tmp_path, "rn", split="all", size=None)
    assert ds.validity_domain is None
    _, _, masks = ds[0]
    assert masks["reshading"].all() and not masks["normal"].all()


def test_default_collate_batches_the_dicts(omni):
    ds = TaskonomyDataset(omni, "sdnA", split="all", size=8)
    image, targets, masks = next(iter(DataLoader(ds, batch_size=4)))
    assert image.shape == (4, 3, 8, 8)
    assert targets["segment_semantic"].shape == (4, 8, 8) and targets["normal"].shape == (4, 3, 8, 8)
    assert masks["depth_zbuffer"].shape == (4, 1, 8, 8) and masks["depth_zbuffer"].dtype == torch.bool
    again = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert torch.equal(again[0][0], ds[0][0])


# ---- resizing ----

def test_resize_semantics(omni):
    raws = write_sample(omni, 3, 0, "allensville")
    native = TaskonomyDataset(omni, ALL, split="train", size=None)[1]
    image, targets, masks = TaskonomyDataset(omni, ALL, split="train", size=8)[1]
    expected_image = F.interpolate(native[0][None], size=(8, 8), mode="bilinear", antialias=True,
                                   align_corners=False)[0]
    assert torch.allclose(image, expected_image) and torch.equal(targets["autoencoder"], image)
    # halving with pixel-centre nearest keeps pixels (2i+1, 2j+1)
    assert torch.equal(targets["segment_semantic"], native[1]["segment_semantic"][1::2, 1::2])
    for name in masks:
        assert torch.equal(masks[name], native[2][name][:, 1::2, 1::2]), name
    # depth: valid pixels average valid raw values only, so no 65535 hole leaks in
    depth = targets["depth_zbuffer"][masks["depth_zbuffer"]]
    valid_raw = raws["depth_zbuffer"][raws["depth_zbuffer"] < 64500]
    low, high = (np.log1p(v) / np.log(65536) for v in (valid_raw.min(), valid_raw.max()))
    assert depth.min() >= low - 1e-6 and depth.max() <= high + 1e-6
    assert (targets["depth_zbuffer"][~masks["depth_zbuffer"]] == 0).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(st.integers(0, 17), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2 ** 16),
       size=st.integers(3, 24))
def test_resized_labels_stay_in_the_label_set(tmp_path_factory, labels, seed, size):
    root = tmp_path_factory.mktemp("labels")
    rgb_dir, seg_dir = root / "rgb", root / "segment_semantic"
    rgb_dir.mkdir(), seg_dir.mkdir()
    rng = np.random.default_rng(seed)
    raw = rng.choice(np.array(labels, dtype=np.uint8), (SIDE, SIDE))
    Image.fromarray(raw).save(seg_dir / file_name(1, 0, "segment_semantic"))
    Image.fromarray(encode("rgb", rng, None)).save(rgb_dir / file_name(1, 0, "rgb"))
    _, targets, masks = TaskonomyDataset(root, "s", split="all", size=size)[0]
    assert set(targets["segment_semantic"].unique().tolist()) <= set(labels)
    assert torch.equal(masks["segment_semantic"][0], targets["segment_semantic"] > 0)


# ---- broken files ----

def one_file(root, domain, point=1, view=0):
    return root / domain / file_name(point, view, domain)


def test_missing_domain_folder_fails_at_construction(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["normal"])
    with pytest.raises(FileNotFoundError, match="depth_zbuffer"):
        TaskonomyDataset(tmp_path, "dn", split="all")


def test_missing_file_names_the_file(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["normal"])
    one_file(tmp_path, "normal").unlink()
    ds = TaskonomyDataset(tmp_path, "n", split="all")
    with pytest.raises(FileNotFoundError, match="point_1_view_0_domain_normal.png"):
        ds[0]


def test_truncated_png_names_the_file_even_if_pillow_allows_truncation(tmp_path, monkeypatch):
    write_sample(tmp_path, 1, 0, domains=["depth_zbuffer"])
    path = one_file(tmp_path, "depth_zbuffer")
    path.write_bytes(path.read_bytes()[:-40])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(TaskonomyFileError, match="point_1_view_0_domain_depth_zbuffer.png.*truncated"):
        TaskonomyDataset(tmp_path, "d", split="all")[0]


def test_corrupt_png_data_names_the_file(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["normal"])
    path = one_file(tmp_path, "normal")
    data = bytearray(path.read_bytes())
    data[50:70] = b"\xff" * 20  # inside the compressed image data; the file still ends with IEND
    path.write_bytes(bytes(data))
    with pytest.raises(TaskonomyFileError, match="point_1_view_0_domain_normal.png"):
        TaskonomyDataset(tmp_path, "n", split="all")[0]
    path.write_bytes(b"not a png at all, just text that is long enough")
    with pytest.raises(TaskonomyFileError, match="not a PNG"):
        TaskonomyDataset(tmp_path, "n", split="all")[0]


def test_wrong_bit_depth_or_colour_type_names_the_file(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["depth_zbuffer", "normal"])
    Image.fromarray(np.zeros((SIDE, SIDE), dtype=np.uint8)).save(one_file(tmp_path, "depth_zbuffer"))
    with pytest.raises(TaskonomyFileError, match="domain_depth_zbuffer.png: expected a PNG in 16-bit grayscale, "
                                                 "found 8-bit grayscale"):
        TaskonomyDataset(tmp_path, "d", split="all")[0]
    Image.fromarray(np.zeros((SIDE, SIDE, 4), dtype=np.uint8)).save(one_file(tmp_path, "normal"))
    with pytest.raises(TaskonomyFileError, match="domain_normal.png: expected a PNG in 8-bit RGB, found 8-bit RGBA"):
        TaskonomyDataset(tmp_path, "n", split="all")[0]


def test_bad_label_values_name_the_file(tmp_path):
    write_sample(tmp_path, 1, 0, domains=["segment_semantic"])
    Image.fromarray(np.full((SIDE, SIDE), 200, dtype=np.uint8)).save(one_file(tmp_path, "segment_semantic"))
    with pytest.raises(TaskonomyFileError, match="domain_segmentsemantic.png: segment_semantic labels"):
        TaskonomyDataset(tmp_path, "s", split="all")[0]


def test_read_png_gives_uint16_for_16_bit_files(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    pixels = read_png(path, ("gray16",))
    assert pixels.dtype == np.uint16 and pixels.tolist() == [[0, 65535]]


def test_directories_link_loops_and_non_utf8_csvs_get_one_clear_error(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(TaskonomyFileError, match="dir.png: is a directory"):
        read_png(tmp_path / "dir.png", ("rgb8",))
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(TaskonomyFileError, match="a.png: cannot be opened"):
        read_png(tmp_path / "a.png", ("rgb8",))
    (tmp_path / "split.csv").write_bytes(b"id,train,val,test\n\xff\xfe,1,0,0\n")
    with pytest.raises(TaskonomyFileError, match="split.csv: not a UTF-8 text file"):
        read_split_csv(tmp_path / "split.csv")


@pytest.mark.parametrize("rows, message", [
    ("a,1,1,0\n", "line 2: building 'a' is in more than one split"),
    ("a,1,0,0\nb,0,0,1\na,0,1,0\n", r"line 4: building 'a' is listed again \(first on line 2\)"),
])
def test_a_split_csv_that_leaks_a_building_into_evaluation_is_refused(tmp_path, rows, message):
    path = tmp_path / "train_val_test_leak.csv"
    path.write_text("id,train,val,test\n" + rows)
    with pytest.raises(TaskonomyFileError, match=message):
        read_split_csv(path)


@pytest.mark.parametrize("damage, message", [
    ("label_size", r"domain_segmentsemantic.png: is 8x8 px but its image is 16x16"),
    ("non_square", r"domain_rgb.png: is 16x12 px; Taskonomy images are square"),
    ("tiny", r"domain_rgb.png: is 1x1 px; Taskonomy images are square, at least 8 px"),
])
def test_images_and_labels_of_the_wrong_shape_are_named(flat, damage, message):
    name = file_name(5, 0, "segment_semantic" if damage == "label_size" else "rgb")
    folder = flat / ("segment_semantic" if damage == "label_size" else "rgb")
    shape = {"label_size": (8, 8), "non_square": (12, 16, 3), "tiny": (1, 1, 3)}[damage]
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(folder / name)
    ds = TaskonomyDataset(flat, "s", split="train", size=None)
    index = next(i for i, s in enumerate(ds.samples) if s.point == 5)
    with pytest.raises(TaskonomyFileError, match=message):
        ds[index]
