"""``mtrobust-fast import-checkpoint``: convert a checkpoint of the MTRobust / AAAI'22 Taskonomy training code
(see :mod:`mtrobust_fast.models.source_import` for the mapping and the input range) or a state dict saved by
LibMTL's trainer for NYUv2 / Cityscapes (:mod:`mtrobust_fast.models.libmtl`) into this project's format; which
one a file is, its keys say.

``attack`` and ``sweep`` also accept such files directly; importing once gives a file that records where it
came from and loads without the conversion.
"""
import sys
from pathlib import Path

from mtrobust_fast.models import libmtl, model_from_config, save_checkpoint, source_import
from mtrobust_fast.models.checkpoint import load_plain


def add_arguments(parser):
    parser.add_argument("source", type=Path, help="the source checkpoint (MTRobust: savecheckpoint/checkpoint_150.pth.tar; "
                                                  "LibMTL: the best.pt its trainer saved under --save_path)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the converted checkpoint (.pt)")
    parser.add_argument("--arch", default=None,
                        help="MTRobust files: the architecture when the file's 'arch' entry is missing or wrong: "
                             f"{', '.join(sorted(source_import.ARCHITECTURES))}")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args):
    try:
        if args.out.exists() and not args.overwrite:
            raise FileExistsError(f"--out: {args.out} exists; pass --overwrite to replace it")
        if args.out.resolve() == args.source.resolve():
            raise ValueError("--out must differ from the source file")
        raw = load_plain(args.source)
        if libmtl.is_libmtl_state_dict(raw):
            if args.arch is not None:
                raise ValueError("--arch: a LibMTL state dict is always its ResNet-50-dilated HPS model; leave "
                                 "--arch out")
            payload = libmtl.convert(raw, where=str(args.source))
        elif source_import.is_source_payload(raw):
            payload = source_import.convert(raw, args.arch, where=str(args.source))
        else:
            raise ValueError(f"{args.source} is neither an MTRobust/AAAI'22 checkpoint (a state_dict with an "
                             f"encoder.conv1 trunk) nor a LibMTL state dict (encoder.layer4.* and decoders.* keys)")
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
