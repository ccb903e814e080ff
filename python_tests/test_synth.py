"""Synthetic Taskonomy: ray-caster geometry, layout and split CSV, encodings, cross-domain consistency,
determinism across worker counts, the CLI, and reading the output back with TaskonomyDataset."""
import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtrobust_fast import cli
from mtrobust_fast.data.synth import scene
from mtrobust_fast.data.synth import taskonomy as synth

SIZE = 64
IMAGES = 6
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.synthesize(tmp_path_factory.mktemp("synth") / "ds", IMAGES, size=SIZE, seed=SEED, workers=1,
                            progress=False)


def files_of(root, domain):
    return sorted((Path(root) / domain / "taskonomy").glob("*/*.png"))


def load(root, domain):
    """All images of one domain, in file order, as one numpy array [N, ...]."""
    return np.stack([np.asarray(Image.open(path)) for path in files_of(root, domain)])


# ---- the ray caster on a hand-made scene -----------------------------------------------------------
def one_sphere_scene(radius=0.5):
    plain = scene.random_material(np.random.default_rng(0), [0.5, 0.5, 0.5])
    room = scene.Room(np.array([6.0, 3.0, 6.0]), [plain] * 6)
    ball = scene.Sphere(np.array([3.0, 1.5, 4.0]), radius, scene.VASE, plain)
    return scene.Scene(room, [ball], np.array([3.0, 2.8, 3.0]), np.ones(3), 0.3, 1.0, np.ones(3), np.ones(3),
                       ball.center, [(0, 1)])


def test_ray_caster_matches_analytic_sphere_and_walls():
    sc = one_sphere_scene()
    camera = scene.look_at(np.array([3.0, 1.5, 1.0]), sc.fixation)
    render = scene.render(sc, camera, 64)
    centre = (32, 32)  # the pixel centre at (32.5, 32.5) is 0.5 px off the axis
    assert render.distance[centre] == pytest.approx(2.5, abs=2e-3)
    nx, ny, nz = render.normal[centre]  # 0.5 px right of and below the axis: tilted right and down
    assert 0 < nx < 0.06 and -0.06 < ny < 0 and nz > 0.99
    np.testing.assert_allclose(render.curvature[centre], [-2.0, -2.0])
    assert render.label[centre] == scene.VASE
    side = (32, 0)  # the far wall z = 6, 5 m ahead, 2.9 m to the side
    assert render.label[side] == scene.BACKGROUND
    np.testing.assert_allclose(render.curvature[side], [0.0, 0.0])
    assert render.zdepth[side] == pytest.approx(5.0, abs=1e-4)
    np.testing.assert_allclose(render.normal[side], [0, 0, 1], atol=1e-5)
    assert render.label[0, 32] == scene.BACKGROUND and render.normal[0, 32, 1] == pytest.approx(-1, abs=1e-5)  # ceiling
    assert render.valid.all()
    assert 0 < render.shading.min() and render.shading.max() <= 1


def test_windows_are_holes_without_geometry():
    sc = one_sphere_scene()
    sc.room.windows = [scene.Window(5, (0.0, 6.0), (0.0, 3.0))]  # the whole far wall
    render = scene.render(sc, scene.look_at(np.array([3.0, 1.5, 1.0]), sc.fixation), 32)
    assert not render.valid[16, 0] and render.valid[16, 16] and render.valid[0, 16]  # far wall, ball, ceiling
    assert render.surface_id[16, 0] == -1 and render.label[16, 0] == 0


# ---- layout, splits, arguments -------------------------------------------------------------------------
def test_layout_and_split_csv(dataset):
    rows = list(csv.reader((dataset / synth.SPLIT_CSV).read_text().splitlines()))
    assert rows[0] == ["id", "train", "val", "test"]
    buildings = [row[0] for row in rows[1:]]
    flags = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert (flags.sum(axis=1) == 1).all() and (flags.sum(axis=0) >= 1).all()
    names = None
    for domain, tag in synth.DOMAIN_TAGS.items():
        paths = files_of(dataset, domain)
        assert len(paths) == IMAGES, domain
        assert {p.parent.name for p in paths} == set(buildings)
        assert all(p.name.endswith(f"_domain_{tag}.png") for p in paths)
        stems = [(p.parent.name, p.name.rsplit("_domain_", 1)[0]) for p in paths]
        assert names is None or stems == names
        names = stems
    assert files_of(dataset, "segment_semantic")[0].name.endswith("_domain_segmentsemantic.png")


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (10, (6, 2, 2)),
                                         (20, (14, 3, 3))])
def test_split_counts(n, expected):
    assert synth.split_counts(n) == expected


def test_plan_spreads_images_over_buildings():
    ids, splits = synth.plan(10, ["a", "b", "c"])
    assert [sum(i.building == b for i in ids) for b in "abc"] == [4, 3, 3]
    assert splits == {"a": "train", "b": "val", "c": "test"}
    assert [(i.point, i.view) for i in ids if i.building == "a"] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    with pytest.raises(ValueError, match="at least as many images"):
        synth.plan(2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="lowercase"):
        synth.plan(2, ["Bad Name"])


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 0}, "images"), ({"size": 48}, "multiple of 32"), ({"size": 0}, "multiple of 32"),
    ({"seed": -1}, "seed"), ({"workers": 0}, "workers"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    arguments = {"out": tmp_path / "x", "images": 2, "size": 32, "seed": 0, "workers": 1, "progress": False}
    with pytest.raises(ValueError, match=message):
        synth.synthesize(**{**arguments, **kwargs})


def test_refuses_to_mix_with_an_existing_dataset(tmp_path):
    synth.synthesize(tmp_path, 1, size=32, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        synth.synthesize(tmp_path, 1, size=32, workers=1, progress=False)
    synth.synthesize(tmp_path, 2, size=32, workers=1, progress=False, buildings=["x", "y"], overwrite=True)
    assert {p.parent.name for p in files_of(tmp_path, "rgb")} == {"x", "y"}


# ---- determinism ---------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_with_any_worker_count(dataset, tmp_path):
    again = synth.synthesize(tmp_path / "again", IMAGES, size=SIZE, seed=SEED, workers=2, progress=False)
    for domain in synth.DOMAIN_TAGS:
        first, second = files_of(dataset, domain), files_of(again, domain)
        assert [p.relative_to(dataset) for p in first] == [p.relative_to(again) for p in second]
        assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(first, second)), domain
    assert filecmp.cmp(dataset / synth.SPLIT_CSV, again / synth.SPLIT_CSV, shallow=False)
    other = synth.synthesize(tmp_path / "other", IMAGES, size=SIZE, seed=SEED + 1, workers=1, progress=False)
    assert not np.array_equal(load(dataset, "rgb"), load(other, "rgb"))


# ---- encodings -----------------------------------------------------------------------------------------
def test_pixel_formats(dataset):
    modes = {"rgb": "RGB", "normal": "RGB", "principal_curvature": "RGB", "reshading": "RGB",
             "segment_semantic": "L", "mask_valid": "L"}
    for domain in synth.DOMAIN_TAGS:
        with Image.open(files_of(dataset, domain)[0]) as image:
            assert image.mode == modes.get(domain, "I;16"), domain
            assert image.size == (SIZE, SIZE)


def test_value_encodings(dataset):
    zbuffer, euclidean = load(dataset, "depth_zbuffer"), load(dataset, "depth_euclidean")
    valid = load(dataset, "mask_valid") == 255
    assert set(np.unique(load(dataset, "mask_valid"))) <= {0, 255}
    assert (~valid).any() and valid.mean() > 0.5  # some holes (windows), mostly geometry
    assert np.array_equal(zbuffer == synth.INVALID_DEPTH, ~valid)
    assert np.array_equal(euclidean == synth.INVALID_DEPTH, ~valid)
    assert zbuffer[valid].max() < 64500 and zbuffer[valid].min() > 0

    normal = load(dataset, "normal")
    assert (normal[~valid] == synth.NORMAL_INVALID).all()
    length = np.linalg.norm(normal[valid] / 127.5 - 1.0, axis=-1)
    assert np.abs(length - 1).max() < 0.02

    curvature = load(dataset, "principal_curvature")
    assert (curvature[..., 2] == 0).all()
    assert (curvature[~valid] == 0).all() and (curvature[valid][:, :2] > 0).all()
    assert (curvature[valid][:, 0] >= curvature[valid][:, 1]).all()  # k1 >= k2

    labels = load(dataset, "segment_semantic")
    assert labels.max() <= 17 and (labels[~valid] == 0).all() and (labels[valid] >= 1).all()
    assert len(np.unique(labels[labels >= 2])) >= 2  # several object classes

    reshading = load(dataset, "reshading")
    assert (reshading[..., 0] == reshading[..., 1]).all() and (reshading[..., 0] == reshading[..., 2]).all()
    for domain in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
        maps = load(dataset, domain)
        assert maps.dtype == np.uint16 and maps.max() > 0, domain
    assert load(dataset, "edge_occlusion").max() <= synth.EDGE_OCCLUSION_PEAK
    assert load(dataset, "keypoints3d")[~valid].max(initial=0) == 0


# ---- consistency between domains ----------------------------------------------------------------------
def test_euclidean_depth_is_zbuffer_along_each_ray(dataset):
    zbuffer = load(dataset, "depth_zbuffer").astype(float)
    euclidean = load(dataset, "depth_euclidean").astype(float)
    valid = zbuffer < 65535
    k = scene.camera_intrinsics(SIZE)
    coords = (np.arange(SIZE) + 0.5 - k[0, 2]) / k[0, 0]
    ray_length = np.sqrt(1 + coords[None, :] ** 2 + coords[:, None] ** 2)
    assert (euclidean[valid] >= zbuffer[valid]).all()
    predicted = (zbuffer * ray_length)[valid]
    rounding = (0.5 + 0.5 * np.broadcast_to(ray_length, zbuffer.shape))[valid]  # both values rounded to units
    assert (np.abs(euclidean[valid] - predicted) <= rounding + 1e-9).all()


def normals_from_depth(z):
    """Camera-frame normals (x right, y up, z to the viewer) of the back-projected z-buffer, central differences."""
    k = scene.camera_intrinsics(z.shape[0])
    u = (np.arange(z.shape[1]) + 0.5 - k[0, 2]) / k[0, 0]
    v = (np.arange(z.shape[0]) + 0.5 - k[1, 2]) / k[1, 1]
    points = np.stack([u[None, :] * z, v[:, None] * z, z], axis=-1)  # x right, y down, z forward
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n *= -np.sign((n * points[1:-1, 1:-1]).sum(-1, keepdims=True))  # face the camera
    return n * [1, -1, -1]


def test_normals_agree_with_depth_on_planes(dataset):
    zbuffer = load(dataset, "depth_zbuffer")
    normal = load(dataset, "normal")
    errors = []
    for z, encoded in zip(zbuffer, normal):
        valid = z < 65535
        # interior of planar patches: the 3x3 neighbourhood is valid and has one encoded normal
        same = np.ones((SIZE - 2, SIZE - 2), bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                window = (slice(dy, dy + SIZE - 2), slice(dx, dx + SIZE - 2))
                same &= valid[window] & (encoded[window] == encoded[1:-1, 1:-1]).all(-1)
        from_depth = normals_from_depth(z.astype(float) / synth.DEPTH_UNITS_PER_M)
        stored = encoded[1:-1, 1:-1] / 127.5 - 1.0
        cosine = (from_depth * stored).sum(-1) / np.linalg.norm(stored, axis=-1)
        errors.append(np.degrees(np.arccos(np.clip(cosine[same], -1, 1))))
    errors = np.concatenate(errors)
    assert errors.size > 1000
    assert np.median(errors) < 2.0 and np.percentile(errors, 90) < 6.0


def test_occlusion_edges_sit_on_depth_discontinuities_and_differ_from_texture_edges(dataset):
    depth = load(dataset, "depth_euclidean").astype(float)
    occlusion = load(dataset, "edge_occlusion")
    texture = load(dataset, "edge_texture")
    valid = depth < 65535

    def neighbourhood(values, fill, reduce):  # over the valid pixels of each 3x3 window
        padded = np.pad(np.where(valid, values, fill), ((0, 0), (1, 1), (1, 1)), constant_values=fill)
        return reduce([padded[:, 1 + dy:1 + dy + SIZE, 1 + dx:1 + dx + SIZE] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)

    jump = (neighbourhood(depth, -np.inf, np.max) - neighbourhood(depth, np.inf, np.min)) / depth
    strong = occlusion >= synth.EDGE_OCCLUSION_PEAK // 2
    assert strong.sum() > 20
    assert (jump[strong] > synth.OCCLUSION_MIN_JUMP).mean() > 0.95
    # texture edges also appear where there is no depth discontinuity (floor tiles, stripes, shadows)
    near_occlusion = np.zeros_like(strong)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near_occlusion |= np.roll(strong, (dy, dx), axis=(1, 2))
    texture_only = (texture > 2000) & ~near_occlusion
    assert texture_only.sum() > 50
    assert np.corrcoef(texture.ravel(), occlusion.ravel())[0, 1] < 0.8


def test_shading_and_labels_come_from_the_same_geometry(dataset):
    labels = load(dataset, "segment_semantic")
    reshading = load(dataset, "reshading")[..., 0]
    valid = load(dataset, "mask_valid") == 255
    assert (reshading[~valid] == 0).all() and (reshading[valid] > 0).all()  # ambient light everywhere
    assert np.array_equal(labels == 0, ~valid)


# ---- CLI and loader ------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["data", "synth", "--out", str(out), "--images", "6", "--size", "64", "--seed", "1",
                     "--workers", "1", "--no-progress", "--buildings", "alpha", "beta", "gamma"])
    assert code == 0 and "wrote 6 images" in capsys.readouterr().out
    assert len(files_of(out, "keypoints3d")) == 6
    assert (out / synth.SPLIT_CSV).read_text().splitlines()[1:] == ["alpha,1,0,0", "beta,0,1,0", "gamma,0,0,1"]
    with pytest.raises(SystemExit, match="multiple of 32"):
        cli.main(["data", "synth", "--out", str(tmp_path / "bad"), "--images", "2", "--size", "50", "--quiet"])


def test_taskonomy_loader_reads_every_task(dataset):
    torch = pytest.importorskip("torch")
    from mtrobust_fast.data.taskonomy import TaskonomyDataset

    seen = 0
    for split in ("train", "val", "test"):
        data = TaskonomyDataset(dataset, tasks="sdDnkKeEprA", split=split, size=32)
        assert data.validity_domain == "mask_valid"
        for image, targets, masks in data:
            seen += 1
            assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
            assert set(targets) == set(masks) and len(targets) == 11
            for name, target in targets.items():
                assert torch.isfinite(target.float()).all(), name
    assert seen == IMAGES


def test_large_preset_holds_only_big_furniture_that_covers_much_of_each_image(tmp_path):
    out = synth.synthesize(tmp_path / "large", 12, size=32, seed=0, workers=1, progress=False, preset="large")
    labels = np.concatenate([np.array(Image.open(p)).ravel()
                             for p in sorted((out / "segment_semantic").rglob("*.png"))])
    big = {scene.DINING_TABLE, scene.CHAIR, scene.COUCH, scene.BED, scene.REFRIGERATOR}
    present = set(np.unique(labels).tolist()) - {0, scene.BACKGROUND}
    assert present and present <= big
    assert np.isin(labels, list(big)).mean() > 0.15  # cluttered rooms: ~0.1 spread over 16 classes
    import json
    assert json.loads((out / synth.INFO_JSON).read_text())["scene"] == "large"
    with pytest.raises(ValueError, match="preset must be one of rooms, large"):
        synth.synthesize(tmp_path / "bad", 3, size=32, progress=False, preset="tiny")


# ---- interrupted and failing generators ------------------------------------------------------------------
def test_a_killed_synth_is_refused_by_readers_and_replaced_without_overwrite(tmp_path, capsys):
    """kill -9 mid-way leaves some images and the unfinished mark: every reader refuses the folder, and the same
    command run again replaces the partial files (no --overwrite: they were never a finished dataset)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mtrobust_fast.data import UNFINISHED
    from mtrobust_fast.data.taskonomy import TaskonomyDataset

    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--images", "400", "--size", "32", "--workers", "1", "--no-progress"]
    writer = subprocess.Popen([sys.executable, "-m", "mtrobust_fast.cli", *argv],
                              cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while not files_of(out, "rgb") and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert files_of(out, "rgb") and (out / UNFINISHED).exists()
    with pytest.raises(ValueError, match="did not finish"):
        TaskonomyDataset(out, "s", split="all", size=None)
    assert cli.main(["train", "--data", str(out), "--out", str(tmp_path / "run"), "--tasks", "s"]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert cli.main(argv[:5] + ["3", *argv[6:]]) == 0  # no --overwrite needed
    assert not (out / UNFINISHED).exists() and len(files_of(out, "rgb")) == 3
    assert len(TaskonomyDataset(out, "s", split="all", size=None)) == 3


def test_a_failing_synth_leaves_nothing_and_a_living_one_is_not_disturbed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from mtrobust_fast.data import UNFINISHED

    calls = []

    def failing(job):
        calls.append(job)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return write(job)

    write = synth._write_image
    monkeypatch.setattr(synth, "_write_image", failing)
    with pytest.raises(OSError):
        synth.synthesize(tmp_path / "ds", 3, size=32, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == []  # the image written first is gone too
    monkeypatch.undo()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / UNFINISHED).write_text(str(sleeper.pid))
        with pytest.raises(ValueError, match="another process"):
            synth.synthesize(tmp_path / "busy", 1, size=32, workers=1, progress=False)
        assert (tmp_path / "busy" / UNFINISHED).read_text() == str(sleeper.pid)
    finally:
        sleeper.kill()
