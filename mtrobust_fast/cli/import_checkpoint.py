"""``mtrobust-fast import-checkpoint``: convert a checkpoint of the MTRobust / AAAI'22 Taskonomy training code
into this project's format (see :mod:`mtrobust_fast.models.source_import` for the mapping and the input range).

``attack`` and ``sweep`` also accept such files directly; importing once gives a file that records where it
came from and loads without the conversion.
"""
import sys
from pathlib import Path

from mtrobust_fast.models import model_from_config, save_checkpoint, source_import


def add_arguments(parser):
    parser.add_argument("source", type=Path, help="the source checkpoint (e.g. savecheckpoint/checkpoint_150.pth.tar)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the converted checkpoint (.pt)")
    parser.add_argument("--arch", default=None,
                        help="architecture when the file's 'arch' entry is missing or wrong: "
                             f"{', '.join(sorted(source_import.ARCHITECTURES))}")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args):
    try:
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"--out: {args.out} exists; pass --overwrite to replace it")
        if args.out.resolve() == args.source.resolve():
            raise ValueError("--out must differ from the source file")
        payload = source_import.convert(source_import.load_source_payload(args.source), args.arch,
                                        where=str(args.source))
        model = model_from_config(payload["config"])
        model.load_state_dict(payload["state_dict"])
        save_checkpoint(args.out, model, **payload["meta"])
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"mtrobust-fast import-checkpoint: error: {error}", file=sys.stderr)
        return 2
    config = payload["config"]
    print(f"wrote {args.out}: {config['encoder']} with tasks {config['tasks']} (epoch {payload['meta']['epoch']}) "
          f"from {args.source}")
    return 0
