"""``mtrobust-fast data synth`` and ``data synth-objects``: write the synthetic Taskonomy scenes
(:mod:`mtrobust_fast.data.synth.taskonomy`) or the synthetic object-classification set (:mod:`mtrobust_fast.data.synth.objects`)."""
import sys

from mtrobust_fast.cli.args import folder, positive_int
from mtrobust_fast.data.synth import nyuv2, objects
from mtrobust_fast.data.synth import rooms
from mtrobust_fast.data.synth import taskonomy


MAX_IMAGES = 1_000_000  # a larger set is refused unless --max-images says so (it is planned in memory first)


def _add_max_images(parser):
    parser.add_argument("--max-images", type=positive_int, default=MAX_IMAGES,
                        help=f"refuse more --images than this (default {MAX_IMAGES:,}): a guard against a typo")


def _check_count(args, command):
    if args.images > args.max_images:
        raise SystemExit(f"mtrobust-fast {command}: error: --images {args.images:,} is more than --max-images "
                         f"{args.max_images:,}; raise --max-images if you mean it")


def add_synth_arguments(parser):
    parser.add_argument("--out", required=True, type=folder, help="dataset root to create")
    parser.add_argument("--images", required=True, type=int, help="number of images")
    parser.add_argument("--size", type=int, default=256, help=f"image side in px, a multiple of {taskonomy.SIZE_MULTIPLE} (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--buildings", nargs="+", default=None, metavar="NAME",
                        help="building names; whole buildings go to one split, in the order given: the last "
                             "round(15%%) (at least 1 from 3 buildings) are test, the ones before them val, the "
                             "rest train (10 buildings: 6/2/2). Default: synth000, ... one per 100 images (--layout "
                             "nyuv2: one per 30), at least 3")
    parser.add_argument("--scene", choices=tuple(rooms.SCENE_PRESETS), default="rooms",
                        help="what the rooms hold: 'rooms' (default) cluttered furnished rooms with 16 object "
                             "classes, many small at a distance; 'large' 2-4 pieces of five big furniture classes "
                             "(table, chair, couch, bed, refrigerator) seen from 1.2-3.2 m, which small CPU models "
                             "learn to segment in minutes (the quickstart's data)")
    parser.add_argument("--layout", choices=("taskonomy", "nyuv2"), default="taskonomy",
                        help="'taskonomy' (default): Taskonomy's PNG encodings and omnidata folders, all 11 tasks; "
                             "'nyuv2': NYUv2's preprocessed .npy layout (train/ and val/ with image, label (13 "
                             "classes), depth, normal), what `train`, `attack` and `sweep` read as NYUv2")
    parser.add_argument("--overwrite", action="store_true", help="replace a synthetic dataset already in --out")
    _add_max_images(parser)
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="no progress bar (as in the other commands; --quiet is the same)")


def _generate(command, write):
    """``write()``'s result; its refusals are one line, and an interrupt says that nothing partial was kept."""
    try:
        return write()
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"mtrobust-fast {command}: error: {error}")
    except KeyboardInterrupt:
        print(f"\nmtrobust-fast {command}: interrupted; the files it had written were removed", file=sys.stderr)
        raise SystemExit(130)


def run_synth(args):
    _check_count(args, "data synth")
    write = nyuv2.synthesize_nyuv2 if args.layout == "nyuv2" else taskonomy.synthesize
    out = _generate("data synth", lambda: write(args.out, args.images, args.size, args.seed, args.workers,
                                                not args.no_progress, args.buildings, args.overwrite,
                                                preset=args.scene))
    print(f"wrote {args.images} images ({args.size} px, {args.layout} layout) to {out}")
    return 0


def add_synth_objects_arguments(parser):
    parser.add_argument("--out", required=True, type=folder, help="dataset folder to create")
    parser.add_argument("--images", required=True, type=int, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image side in px (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an object dataset already in --out")
    _add_max_images(parser)
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="no progress bar (as in the other commands; --quiet is the same)")


def run_synth_objects(args):
    _check_count(args, "data synth-objects")
    out = _generate("data synth-objects", lambda: objects.synthesize_objects(
        args.out, args.images, args.size, args.seed, args.workers, not args.no_progress, args.overwrite))
    print(f"wrote {args.images} object images ({args.size} px, {len(objects.CLASSES)} classes) to {out}")
    return 0
