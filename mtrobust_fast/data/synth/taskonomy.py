"""``mtrobust-fast data synth``: a synthetic Taskonomy dataset in the real encodings and omnidata layout.

Each image is one ray-cast room (:mod:`mtrobust_fast.data.synth.rooms`, :mod:`mtrobust_fast.data.synth.scene`); every
domain is derived from that single cast, so depth, normals, curvature, shading, labels, edges and keypoints
agree with each other the way the real ones do. Files land in
``DIR/{domain}/taskonomy/{building}/point_{P}_view_{V}_domain_{tag}.png`` next to the split CSV
``DIR/train_val_test_synthetic.csv`` (``id,train,val,test``, one building per row) and
``DIR/synthetic_info.json`` (intrinsics and scales), so the loader that reads real Taskonomy reads this too.
Everything is a function of (seed, building, point, view), which the image index determines: the same seed
gives byte-identical files whatever the number of workers.

Encodings (Taskonomy's, as measured on its sample images) and the scales chosen where the real data leaves them open:
- depth_zbuffer / depth_euclidean: 16-bit, 1/512 m; 65535 where a ray meets no geometry (windows, doors).
- normal: camera frame (x right, y up, z towards the viewer), p = (n + 1) * 127.5; invalid (128, 128, 128).
- principal_curvature: R = 127 + 5 k1, G = 127 + 5 k2 (1/m, k1 >= k2, convex negative; box edges are rounded
  with 4 cm radius), B = 0; invalid (0, 0, 0). Over many images R is about 129 +- 19 and G 121 +- 25
  (real: 123.6 +- 31.9 and 120.1 +- 21.7).
- reshading: 255 * shading (ambient + Lambert from the point light, with shadows), the very factor that
  multiplies the albedo in rgb; 3 equal channels.
- edge_texture: gradient magnitude of the blurred rgb luminance (peaks ~10k): texture, shadow and colour edges.
- edge_occlusion: 4700 on the near side of depth jumps > 5 % between different surfaces, lightly blurred.
- keypoints2d: corner strength (smaller structure-tensor eigenvalue) of the rgb, saturating at 1100.
- keypoints3d: blurred |k1 k2| (box and room corners, small spheres, rims), saturating at 58000.
- segment_semantic: 0 no geometry, 1 background (room, cabinets, shelves, pillars, pictures, balls),
  2..17 Taskonomy's COCO classes. mask_valid: 255 where there is geometry, else 0.
"""
import json
import math
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from mtrobust_fast.data import UNFINISHED
from mtrobust_fast.data.synth import rooms
from mtrobust_fast.data.synth import scene
from mtrobust_fast.files import FolderLock, writable_folder

# Folder name -> file tag (only segmentation differs), in the order files are written.
DOMAIN_TAGS = {
    "rgb": "rgb",
    "segment_semantic": "segmentsemantic",
    "depth_zbuffer": "depth_zbuffer",
    "depth_euclidean": "depth_euclidean",
    "normal": "normal",
    "principal_curvature": "principal_curvature",
    "reshading": "reshading",
    "edge_texture": "edge_texture",
    "edge_occlusion": "edge_occlusion",
    "keypoints2d": "keypoints2d",
    "keypoints3d": "keypoints3d",
    "mask_valid": "mask_valid",
}
SPLIT_CSV = "train_val_test_synthetic.csv"
INFO_JSON = "synthetic_info.json"

DEPTH_UNITS_PER_M = 512  # Taskonomy: 1/512 m per unit
INVALID_DEPTH = 65535
NORMAL_INVALID = 128
CURVATURE_ZERO = 127
CURVATURE_SCALE = 5.0  # encoded units per 1/m: bevels (25/m) just fit in 1..255
# Peak values of the 16-bit maps, matched to real Taskonomy sample images.
EDGE_TEXTURE_GAIN = 65000.0  # per unit of blurred-luminance gradient; strong edges reach ~9-10k
EDGE_OCCLUSION_PEAK = 4700
KEYPOINTS2D_PEAK = 1100
KEYPOINTS2D_SCALE = 1e-3  # corner strength (structure-tensor eigenvalue) that reaches 63 % of the peak
KEYPOINTS3D_PEAK = 58000
KEYPOINTS3D_SCALE = 20.0  # blurred |k1 k2| in 1/m^2 that reaches 63 % of the peak
OCCLUSION_MIN_JUMP = 0.05  # relative depth jump that makes an occlusion edge
VIEWS_PER_POINT = 3
IMAGES_PER_BUILDING = 100
SIZE_MULTIPLE = 32
PNG_COMPRESS_LEVEL = 1  # with zlib's run-length strategy: the fastest Pillow setting, ~260 KB per 256-px image
PNG_COMPRESS_TYPE = 3  # zlib Z_RLE

_BUILDING_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class ImageId:
    """Where one synthetic image lives and which random streams draw it."""

    building_index: int
    building: str
    point: int
    view: int

    def filename(self, domain):
        return f"point_{self.point}_view_{self.view}_domain_{DOMAIN_TAGS[domain]}.png"


# --------------------------------------------------------------------------------------------------
# Splits and image ids
# --------------------------------------------------------------------------------------------------
def split_counts(n):
    """(train, val, test) sizes for n buildings: about 70/15/15, each split non-empty when n >= 3."""
    if n >= 3:
        val = test = max(1, round(0.15 * n))
    else:
        val, test = (1 if n == 2 else 0), 0
    return n - val - test, val, test


def default_buildings(images):
    """Names for about IMAGES_PER_BUILDING images per building, at least three buildings when possible."""
    count = min(images, max(3, math.ceil(images / IMAGES_PER_BUILDING)))
    return [f"synth{b:03d}" for b in range(count)]


def plan(images, buildings=None):
    """The ImageIds of a dataset (images spread evenly over buildings) and each building's split."""
    buildings = default_buildings(images) if buildings is None else list(buildings)
    if not buildings:
        raise ValueError("need at least one building")
    if len(buildings) > images:
        raise ValueError(f"{len(buildings)} buildings need at least as many images, got {images}")
    if len(set(buildings)) != len(buildings):
        raise ValueError("building names must be unique")
    for name in buildings:
        if not _BUILDING_NAME.match(name):
            raise ValueError(f"building name {name!r} must be lowercase letters, digits, '_' or '-'")
    n_train, n_val, _ = split_counts(len(buildings))
    splits = {name: "train" if b < n_train else "val" if b < n_train + n_val else "test" for b, name in enumerate(buildings)}
    per_building, extra = divmod(images, len(buildings))
    ids = []
    for b, name in enumerate(buildings):
        for j in range(per_building + (b < extra)):
            ids.append(ImageId(b, name, j // VIEWS_PER_POINT, j % VIEWS_PER_POINT))
    return ids, splits


def write_split_csv(path, splits):
    lines = ["id,train,val,test"]
    for name, split in splits.items():
        lines.append(",".join([name] + [str(int(split == s)) for s in ("train", "val", "test")]))
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Domains from one render
# --------------------------------------------------------------------------------------------------
def _luminance(rgb):
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _central_differences(image):
    """x and y derivatives per pixel (zero on the border): cheaper than Sobel and enough after smoothing."""
    gx, gy = np.zeros_like(image), np.zeros_like(image)
    gx[:, 1:-1] = (image[:, 2:] - image[:, :-2]) * 0.5
    gy[1:-1] = (image[2:] - image[:-2]) * 0.5
    return gx, gy


def _structure_min_eigenvalue(gx, gy, sigma):
    """Smaller eigenvalue of the smoothed structure tensor of a field whose channels have gradients gx, gy:
    large only where the field varies in two directions (corners), not along straight edges."""
    a = ndimage.gaussian_filter(sum(g * g for g in gx), sigma)
    c = ndimage.gaussian_filter(sum(g * g for g in gy), sigma)
    b = ndimage.gaussian_filter(sum(x * y for x, y in zip(gx, gy)), sigma)
    return np.maximum((a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b), 0.0)


def _to_uint16(values):
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


def encode_depth(metres, valid):
    """Taskonomy 16-bit depth: 1/512 m units, 65535 where there is no geometry."""
    units = np.clip(np.rint(np.where(valid, metres, 0) * DEPTH_UNITS_PER_M), 0, INVALID_DEPTH - 1)
    return np.where(valid, units, INVALID_DEPTH).astype(np.uint16)


def occlusion_edges(distance, surface_id, valid):
    """Pixels on the near side of a depth discontinuity between two different surfaces (bool [H, W])."""
    edges = np.zeros_like(valid)
    depth = np.where(valid, distance, 0.0)
    for axis in (0, 1):
        first = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
        second = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        pair = valid[first] & valid[second] & (surface_id[first] != surface_id[second])
        gap = depth[second] - depth[first]
        edges[first] |= pair & (gap > OCCLUSION_MIN_JUMP * depth[first])
        edges[second] |= pair & (-gap > OCCLUSION_MIN_JUMP * depth[second])
    return edges


def domains_of(render):
    """Every Taskonomy domain of one render, as the arrays written to PNG."""
    size = render.rgb.shape[0]
    px = size / 256.0  # filters scale with resolution so maps look alike at any size
    valid = render.valid
    rgb8 = np.clip(np.rint(render.rgb * 255), 0, 255).astype(np.uint8)

    normal = np.where(valid[..., None], np.clip(np.rint((render.normal + 1) * 127.5), 0, 255), NORMAL_INVALID)
    curv = np.clip(np.rint(CURVATURE_ZERO + CURVATURE_SCALE * render.curvature), 1, 255)
    curvature = np.zeros((size, size, 3), np.uint8)
    curvature[..., :2] = np.where(valid[..., None], curv, 0)
    shade = np.where(valid, np.clip(np.rint(render.shading * 255), 0, 255), 0).astype(np.uint8)

    # Derivatives are taken per 1/256 of the image side so the maps do not depend on the resolution.
    luminance = ndimage.gaussian_filter(_luminance(rgb8.astype(np.float32) / 255), max(0.6, px))
    gx, gy = (g * px for g in _central_differences(luminance))
    edge_texture = _to_uint16(np.hypot(gx, gy) * EDGE_TEXTURE_GAIN)
    corners_2d = _structure_min_eigenvalue([gx], [gy], 1.5 * max(px, 0.5))
    keypoints2d = _to_uint16(KEYPOINTS2D_PEAK * (1 - np.exp(-corners_2d / KEYPOINTS2D_SCALE)))

    occlusion = occlusion_edges(render.distance, render.surface_id, valid).astype(np.float32)
    sigma = 0.7 * max(px, 1.0)
    line_peak = ndimage.gaussian_filter1d(np.eye(1, 9, 4, dtype=np.float32)[0], sigma)[4]  # blurred 1-px line -> 1
    occlusion = ndimage.gaussian_filter(occlusion, sigma) / line_peak
    edge_occlusion = _to_uint16(EDGE_OCCLUSION_PEAK * np.clip(occlusion, 0, 1))

    # 3-D keypoints: where both principal curvatures are large (box and room corners, small spheres, rims).
    gaussian_curvature = np.abs(render.curvature[..., 0] * render.curvature[..., 1])
    corners_3d = ndimage.gaussian_filter(gaussian_curvature, 2.0 * max(px, 0.5))
    keypoints3d = _to_uint16(KEYPOINTS3D_PEAK * (1 - np.exp(-corners_3d / KEYPOINTS3D_SCALE)))
    keypoints3d[~valid] = 0

    return {
        "rgb": rgb8,
        "segment_semantic": render.label,
        "depth_zbuffer": encode_depth(render.zdepth, valid),
        "depth_euclidean": encode_depth(render.distance, valid),
        "normal": normal.astype(np.uint8),
        "principal_curvature": curvature,
        "reshading": np.repeat(shade[..., None], 3, axis=2),
        "edge_texture": edge_texture,
        "edge_occlusion": edge_occlusion,
        "keypoints2d": keypoints2d,
        "keypoints3d": keypoints3d,
        "mask_valid": np.where(valid, 255, 0).astype(np.uint8),
    }


def render_image(image_id, size, seed, preset="rooms"):
    """The render of one image: style from (seed, building), room from the point, camera from the view; what the
    room holds and how far the camera stands from the preset (``rooms.SCENE_PRESETS``)."""
    b, p, v = image_id.building_index, image_id.point, image_id.view
    style = rooms.sample_style(np.random.default_rng([seed, 0, b]))
    room = rooms.sample_scene(style, np.random.default_rng([seed, 1, b, p]), preset)
    camera = rooms.sample_camera(room, np.random.default_rng([seed, 2, b, p, v]), preset)
    return scene.render(room, camera, size)


def _write_image(job):
    out, size, seed, preset, image_id = job
    for domain, array in domains_of(render_image(image_id, size, seed, preset)).items():
        path = Path(out) / domain / "taskonomy" / image_id.building / image_id.filename(domain)
        Image.fromarray(array).save(path, compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE)


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
def _check_arguments(images, size, seed, workers, preset):
    if preset not in rooms.SCENE_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(rooms.SCENE_PRESETS)}, got {preset!r}")
    if not isinstance(images, int) or images <= 0:
        raise ValueError(f"images must be a positive integer, got {images!r}")
    if not isinstance(size, int) or size <= 0 or size % SIZE_MULTIPLE:
        raise ValueError(f"size must be a positive multiple of {SIZE_MULTIPLE} (what the models accept), got {size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if workers is not None and (not isinstance(workers, int) or workers <= 0):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def clear_outputs(out, names, overwrite, what="a synthetic dataset"):
    """Refuse to write over the files or folders ``names`` in ``out`` unless ``overwrite``; then delete them."""
    existing = [out / name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {what} ({existing[0].name}); pass overwrite=True / --overwrite")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextmanager
def writing_dataset(out, names, overwrite, what="a synthetic dataset"):
    """The folder ``out`` (a Path), checked writable, emptied of the outputs ``names`` and marked unfinished
    (``data.UNFINISHED``, holding this process's id) while a generator writes them. Readers refuse a marked
    folder; another generator is refused while this one lives. An error removes what was written (nothing is
    left half written); a killed generator leaves the mark, and the next run replaces its partial outputs
    without asking for ``overwrite`` (they were never a finished dataset)."""
    out = writable_folder(out, "out")
    interrupted = (out / UNFINISHED).exists()
    with FolderLock(out, "out", marker=UNFINISHED):
        clear_outputs(out, names, overwrite or interrupted, what)
        try:
            yield out
        except BaseException:
            clear_outputs(out, names, True)
            raise


def run_jobs(write, jobs, workers=None, progress=True):
    """``write(job)`` for every job, in ``workers`` processes (default: CPU count), with a progress bar."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), disable=not progress, unit="img", desc="synth") as bar:
        if workers == 1:
            for job in jobs:
                write(job)
                bar.update()
        else:
            chunk = max(1, min(8, len(jobs) // (4 * workers)))
            # fork where there is one: no re-import of the caller's script (which spawn needs guarded by
            # __main__) and a fast start; the workers use numpy, scipy and Pillow only, never torch.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                for _ in pool.map(write, jobs, chunksize=chunk):
                    bar.update()


def synthesize(out, images, size=256, seed=0, workers=None, progress=True, buildings=None, overwrite=False,
               preset="rooms"):
    """Write ``images`` synthetic Taskonomy images of ``size`` px under ``out``; returns ``out`` as a Path.
    ``preset``: a scene preset of ``rooms.SCENE_PRESETS`` ("rooms": cluttered furnished rooms; "large": fewer, larger
    objects seen from closer), recorded in the info JSON."""
    _check_arguments(images, size, seed, workers, preset)
    ids, splits = plan(images, buildings)
    with writing_dataset(out, list(DOMAIN_TAGS) + [SPLIT_CSV, INFO_JSON], overwrite) as out:
        _write_taskonomy(out, ids, splits, size, seed, preset, images, workers, progress)
    return out


def _write_taskonomy(out, ids, splits, size, seed, preset, images, workers, progress):
    for domain in DOMAIN_TAGS:
        for name in splits:
            (out / domain / "taskonomy" / name).mkdir(parents=True, exist_ok=True)
    run_jobs(_write_image, [(str(out), size, seed, preset, image_id) for image_id in ids], workers, progress)
    write_split_csv(out / SPLIT_CSV, splits)
    info = {
        "generator": "mtrobust_fast.data.synth.taskonomy",
        "images": images, "size": size, "seed": seed, "scene": preset,
        "intrinsics": scene.camera_intrinsics(size).tolist(),
        "fov_degrees": scene.FOV_DEGREES,
        "depth_units_per_m": DEPTH_UNITS_PER_M,
        "curvature": {"zero": CURVATURE_ZERO, "units_per_inverse_m": CURVATURE_SCALE, "bevel_m": scene.BEVEL_M},
        "normal_frame": "camera: x right, y up, z towards the viewer; p = (n + 1) * 127.5",
        "views_per_point": VIEWS_PER_POINT,
        "splits": splits,
    }
    (out / INFO_JSON).write_text(json.dumps(info, indent=1) + "\n")
