"""``mtrobust-fast data synth --layout nyuv2``: the synthetic rooms written in NYUv2's preprocessed ``.npy`` layout
(:mod:`mtrobust_fast.data.benchmarks`), so that everything NYUv2 needs runs offline.

The same renders as the synthetic Taskonomy set (same seed, same images), written as NYUv2 files:
``{train,val}/image/i.npy`` float32 [S, S, 3] in [0, 1]; ``label/i.npy`` float32 [S, S] with NYUv2's 13
classes; ``depth/i.npy`` float32 [S, S, 1], z-depth in metres, 0 where a ray meets no geometry;
``normal/i.npy`` float32 [S, S, 3], unit camera-frame normals (x right, y up, z towards the viewer), the zero
vector where there is no geometry. Images are square (the renderer's), unlike NYUv2's 288×384.

Buildings split as in the Taskonomy layout, one building per ``IMAGES_PER_BUILDING`` images by default (at least
3), so that even a few hundred images split about 60/40; NYUv2 has no test split, so the test buildings join
``val``.

Class mapping (synthetic -> NYUv2): the room's floor -> floor, ceiling -> ceiling, its four walls -> wall;
what is seen through windows and doors (no geometry) -> window; bed -> bed, book -> books, chair -> chair,
couch -> sofa, dining table -> table, tv -> tv; refrigerator, oven, sink, toilet and the unlabelled furniture
(cabinets, shelves, pillars, pictures, balls) -> furniture; bottle, potted plant, microwave, toaster, clock and
vase -> objects. NYUv2's "picture" never occurs (pictures are not told apart from the other furniture).
"""
import json
import math
from pathlib import Path

import numpy as np

from mtrobust_fast.data.benchmarks import NYUV2_CLASSES
from mtrobust_fast.data.synth import scene
from mtrobust_fast.data.synth.taskonomy import _check_arguments, plan, render_image, run_jobs, writing_dataset

INFO_JSON = "synthetic_info.json"
IMAGES_PER_BUILDING = 30
FOLDERS = ("image", "label", "depth", "normal")
NYU = {name: i for i, name in enumerate(NYUV2_CLASSES)}
ROOM_SURFACES = {0: "wall", 1: "wall", 2: "floor", 3: "ceiling", 4: "wall", 5: "wall"}  # scene.Room surfaces
OBJECT_CLASSES = {
    scene.BACKGROUND: "furniture", scene.BED: "bed", scene.BOOK: "books", scene.CHAIR: "chair",
    scene.COUCH: "sofa", scene.DINING_TABLE: "table", scene.TV: "tv", scene.REFRIGERATOR: "furniture",
    scene.OVEN: "furniture", scene.SINK: "furniture", scene.TOILET: "furniture", scene.BOTTLE: "objects",
    scene.POTTED_PLANT: "objects", scene.MICROWAVE: "objects", scene.TOASTER: "objects", scene.CLOCK: "objects",
    scene.VASE: "objects",
}


def nyu_labels(render):
    """NYUv2 class indices [S, S] (float32, as the release stores them) of one render."""
    surface = render.surface_id.astype(np.int64)
    labels = np.full(surface.shape, NYU["window"], np.float32)
    for index, name in ROOM_SURFACES.items():
        labels[surface == index] = NYU[name]
    objects = surface >= 6
    lookup = np.full(256, NYU["furniture"], np.float32)
    for taskonomy_label, name in OBJECT_CLASSES.items():
        lookup[taskonomy_label] = NYU[name]
    labels[objects] = lookup[render.label[objects]]
    return labels


def _write(job):
    out, size, seed, preset, image_id, split, index = job
    render = render_image(image_id, size, seed, preset)
    valid = render.valid
    arrays = {
        "image": render.rgb.astype(np.float32).clip(0, 1),
        "label": nyu_labels(render),
        "depth": np.where(valid, render.zdepth, 0).astype(np.float32)[..., None],
        "normal": np.where(valid[..., None], render.normal, 0).astype(np.float32),
    }
    for folder, array in arrays.items():
        np.save(Path(out) / split / folder / f"{index}.npy", array)


def synthesize_nyuv2(out, images, size=64, seed=0, workers=None, progress=True, buildings=None, overwrite=False,
                     preset="rooms"):
    """Write ``images`` synthetic rooms of ``size`` px in the NYUv2 layout under ``out``; returns ``out``."""
    _check_arguments(images, size, seed, workers, preset)
    if buildings is None:
        buildings = [f"synth{b:03d}" for b in range(min(images, max(3, math.ceil(images / IMAGES_PER_BUILDING))))]
    ids, splits = plan(images, buildings)
    with writing_dataset(out, ["train", "val", INFO_JSON], overwrite, "a NYUv2-layout dataset") as out:
        _write_nyuv2(out, ids, splits, size, seed, preset, images, workers, progress)
    return out


def _write_nyuv2(out, ids, splits, size, seed, preset, images, workers, progress):
    counters, jobs = {"train": 0, "val": 0}, []
    for image_id in ids:
        split = "train" if splits[image_id.building] == "train" else "val"
        jobs.append((str(out), size, seed, preset, image_id, split, counters[split]))
        counters[split] += 1
    for split in counters:
        for folder in FOLDERS:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
    run_jobs(_write, jobs, workers, progress)
    info = {"generator": "mtrobust_fast.data.synth.nyuv2", "layout": "nyuv2", "images": images, "size": size,
            "seed": seed, "scene": preset, "classes": list(NYUV2_CLASSES), "depth": "z-depth in metres, 0 unknown",
            "normal_frame": "camera: x right, y up, z towards the viewer; 0 vector unknown",
            "splits": {name: "train" if s == "train" else "val" for name, s in splits.items()}, "counts": counters}
    (out / INFO_JSON).write_text(json.dumps(info, indent=1) + "\n")
