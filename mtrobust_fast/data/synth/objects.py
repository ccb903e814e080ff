"""``mtrobust-fast data synth-objects``: a synthetic object-classification set rendered with the scene generator.

Each image shows one object of ``CLASSES`` in a random room (the building styles, materials, windows and lights
of :mod:`mtrobust_fast.data.synth.rooms`): the object's pose (where it stands, its yaw, the camera's azimuth,
elevation and distance), its colours, the light and the room vary from image to image; the label is the object
in front of the camera, and nothing else in the room is an object of a class. The same ray cast gives each
image's depth and surface normals (GAT's depth task uses them). Images are rendered at twice the size and
averaged 2×2 (anti-aliasing); depth and normals are the mean over the valid sub-pixels.

Layout: ``DIR/rgb/NNNNNN.png`` (RGB), ``DIR/depth/NNNNNN.png`` (16-bit z-depth in 1/512 m, 65535 where there is
no geometry), ``DIR/normal/NNNNNN.png`` (camera-frame normals, p = (n + 1)·127.5, (128, 128, 128) invalid),
``DIR/labels.csv`` (``file,label,class_name,split``) and ``DIR/objects.json`` (format, classes, size, seed,
and the training split's per-channel pixel mean and std, which classifiers use to normalise inputs).
Class k is image index mod ``len(CLASSES)``; splits go by blocks of ``len(CLASSES)`` consecutive images (70 %
train, 15 % val, 15 % test; the first 30 images hold all three), so every split is class-balanced. Each image depends only on (seed, index):
the same seed gives byte-identical files whatever the number of workers.
"""
import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mtrobust_fast.data.synth import rooms
from mtrobust_fast.data.synth import scene
from mtrobust_fast.data.synth.taskonomy import DEPTH_UNITS_PER_M, INVALID_DEPTH, NORMAL_INVALID, writing_dataset

FORMAT = "mtrobust-fast/objects/v1"
META_JSON = "objects.json"
LABELS_CSV = "labels.csv"
DOMAINS = ("rgb", "depth", "normal")
# Furniture the room furnisher can build, free-standing (any azimuth) or standing against a wall (seen from
# the front half-space).
CLASSES = ("chair", "table", "plant", "ball", "couch", "bed", "cabinet", "fridge", "oven", "toilet")
FREE_STANDING = ("chair", "table", "plant", "ball")  # the others stand against a wall (their domain label is 1)
SUPERSAMPLE = 2
# The split of each block of len(CLASSES) consecutive images, cycling every 20 blocks (14 train, 3 val, 3 test);
# val and test blocks come early, so small sets have them too.
SPLIT_CYCLE = "tvxttttvttxttttvtxtt"


def split_of(index):
    """"train", "val" or "test" for image ``index`` (by blocks of one image per class)."""
    return {"t": "train", "v": "val", "x": "test"}[SPLIT_CYCLE[(index // len(CLASSES)) % len(SPLIT_CYCLE)]]


def _object_scene(kind, rng):
    """A room holding one object of ``kind``; returns (scene, object centre, object radius, front yaw or None)."""
    for _ in range(50):
        style = rooms.sample_style(rng)
        size = np.array([rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.2), rng.uniform(4.0, 7.0)])
        room = scene.Room(size, rooms._room_materials(style, rng), rooms._windows(size, rng))
        furnish = rooms._Furnisher(rng, size)
        if rng.uniform() < 0.5:  # a picture on a wall: background clutter that is no class
            furnish.add_wall_object("picture")
        start = len(furnish.primitives)
        furnish.add_floor_object(kind)
        parts = furnish.primitives[start:]
        if not parts:
            continue
        lo = np.min([p.aabb()[0] for p in parts], axis=0)
        hi = np.max([p.aabb()[1] for p in parts], axis=0)
        yaw = None if kind in FREE_STANDING else float(getattr(parts[0], "yaw", 0.0))
        light = furnish.light_position()
        world = scene.Scene(
            room=room, primitives=furnish.primitives, light=light, light_color=style.light_color,
            ambient=float(rng.uniform(0.15, 0.45)), exposure=float(rng.uniform(0.8, 1.4)),
            sky_top=scene.hsv(rng.uniform(0.55, 0.65), rng.uniform(0.1, 0.4), 1.0),
            sky_bottom=scene.hsv(rng.uniform(0.55, 0.65), 0.05, rng.uniform(0.85, 1.0)),
            fixation=(lo + hi) / 2, groups=[(start, len(furnish.primitives))],
        )
        return world, (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2), yaw
    raise RuntimeError(f"could not place a {kind} in 50 rooms")


def _camera(world, centre, radius, front_yaw, rng):
    """A camera looking at the object from a random azimuth (the front half-space for wall objects), at a
    distance where the object fills about half to all of the view, inside the room."""
    size = world.room.size
    half_fov = np.radians(scene.FOV_DEGREES) / 2
    for _ in range(100):
        azimuth = rng.uniform(-np.pi, np.pi) if front_yaw is None else front_yaw + rng.uniform(-1.1, 1.1)
        distance = radius / np.tan(half_fov) * rng.uniform(0.9, 1.6)
        height = rng.uniform(0.4, 1.9)
        position = np.array([centre[0] + distance * np.sin(azimuth), height, centre[2] + distance * np.cos(azimuth)])
        if np.all(position > 0.15) and np.all(position < size - 0.15):
            target = centre + rng.uniform(-0.1, 0.1, 3) * radius
            return scene.look_at(position, target)
    return scene.look_at(np.array([size[0] / 2, 1.5, size[2] / 2]), centre)


def _pool(values, valid, factor):
    """Mean of each factor×factor block over its valid sub-pixels; (pooled, any valid)."""
    h, w = valid.shape[0] // factor, valid.shape[1] // factor
    shape = (h, factor, w, factor) + values.shape[2:]
    v = np.where(valid.reshape(valid.shape + (1,) * (values.ndim - 2)), values, 0).reshape(shape)
    count = valid.reshape(h, factor, w, factor).sum(axis=(1, 3))
    total = v.sum(axis=(1, 3))
    denominator = np.maximum(count, 1).reshape(count.shape + (1,) * (values.ndim - 2))
    return total / denominator, count > 0


def render_object(index, size, seed):
    """(label, rgb uint8 [S,S,3], depth uint16 [S,S], normal uint8 [S,S,3]) of image ``index``."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, index])
    world, centre, radius, front_yaw = _object_scene(CLASSES[label], rng)
    camera = _camera(world, centre, radius, front_yaw, rng)
    render = scene.render(world, camera, size * SUPERSAMPLE)
    rgb = render.rgb.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    depth, depth_valid = _pool(np.nan_to_num(render.zdepth, posinf=0.0), render.valid, SUPERSAMPLE)
    normal, _ = _pool(render.normal, render.valid, SUPERSAMPLE)
    norms = np.linalg.norm(normal, axis=-1, keepdims=True)
    normal = np.where(norms > 0, normal / np.maximum(norms, 1e-12), 0.0)
    rgb8 = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    depth16 = np.where(depth_valid, np.clip(np.rint(depth * DEPTH_UNITS_PER_M), 0, INVALID_DEPTH - 1),
                       INVALID_DEPTH).astype(np.uint16)
    normal8 = np.where(depth_valid[..., None], np.clip(np.rint((normal + 1) * 127.5), 0, 255),
                       NORMAL_INVALID).astype(np.uint8)
    return label, rgb8, depth16, normal8


def _name(index):
    return f"{index:06d}.png"


def _write(job):
    out, size, seed, index = job
    label, rgb, depth, normal = render_object(index, size, seed)
    for domain, array in zip(DOMAINS, (rgb, depth, normal)):
        Image.fromarray(array).save(Path(out) / domain / _name(index), compress_level=1)
    return label, rgb.reshape(-1, 3).astype(np.float64).sum(0), (rgb.reshape(-1, 3).astype(np.float64) ** 2).sum(0)


def synthesize_objects(out, images, size=32, seed=0, workers=None, progress=True, overwrite=False):
    """Write ``images`` object images of ``size`` px under ``out``; returns ``out`` as a Path."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive integer, got {images!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    with writing_dataset(out, list(DOMAINS) + [LABELS_CSV, META_JSON], overwrite, "an object dataset") as out:
        _write_objects(out, images, size, seed, workers, progress)
    return out


def _write_objects(out, images, size, seed, workers, progress):
    for domain in DOMAINS:
        (out / domain).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), size, seed, i) for i in range(images)]
    workers = min(workers or os.cpu_count() or 1, images)
    results = []
    with tqdm(total=images, disable=not progress, unit="img", desc="synth-objects") as bar:
        if workers == 1:
            for job in jobs:
                results.append(_write(job))
                bar.update()
        else:
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                for result in pool.map(_write, jobs, chunksize=max(1, min(16, images // (4 * workers)))):
                    results.append(result)
                    bar.update()
    train = [r for i, r in enumerate(results) if split_of(i) == "train"] or results
    pixels = len(train) * size * size * 255.0
    mean = sum(r[1] for r in train) / pixels
    std = np.sqrt(np.maximum(sum(r[2] for r in train) / (pixels * 255.0) - mean ** 2, 0.0))
    with open(out / LABELS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "class_name", "split"])
        for i, (label, _, _) in enumerate(results):
            writer.writerow([_name(i), label, CLASSES[label], split_of(i)])
    meta = {"format": FORMAT, "classes": list(CLASSES), "images": images, "size": size, "seed": seed,
            "mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std],
            "depth_units_per_m": DEPTH_UNITS_PER_M, "domains": list(DOMAINS)}
    (out / META_JSON).write_text(json.dumps(meta, indent=1) + "\n")
