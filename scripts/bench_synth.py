"""Measure the synthetic Taskonomy generator: images/s end to end, and CPU time per stage in one process.

    PYTHONPATH=. python scripts/bench_synth.py --images 200 --size 256 --workers 2
"""
import argparse
import io
import os
import tempfile
import time

from PIL import Image

from mtrobust_fast.data.synth import taskonomy


def stage_times(size, count, seed):
    """CPU ms per image for render, domain maps and PNG encoding, measured serially in this process."""
    ids, _ = taskonomy.plan(count)
    totals = {"render": 0.0, "domains": 0.0, "png": 0.0}
    for image_id in ids:
        start = time.process_time()
        render = taskonomy.render_image(image_id, size, seed)
        mid = time.process_time()
        domains = taskonomy.domains_of(render)
        end = time.process_time()
        for array in domains.values():
            Image.fromarray(array).save(
                io.BytesIO(), format="PNG", compress_level=taskonomy.PNG_COMPRESS_LEVEL, compress_type=taskonomy.PNG_COMPRESS_TYPE
            )
        totals["render"] += mid - start
        totals["domains"] += end - mid
        totals["png"] += time.process_time() - end
    return {name: 1e3 * value / count for name, value in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage-images", type=int, default=20, help="images for the per-stage breakdown (0: skip)")
    args = parser.parse_args()

    if args.stage_images:
        stages = stage_times(args.size, args.stage_images, args.seed)
        total = sum(stages.values())
        print("CPU ms per image (1 process): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + f", total {total:.1f}")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        taskonomy.synthesize(out, args.images, args.size, args.seed, args.workers, progress=False)
        elapsed = time.perf_counter() - start
    print(f"{args.images} images of {args.size} px, {args.workers} workers: {elapsed:.2f} s, "
          f"{args.images / elapsed:.1f} images/s (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
