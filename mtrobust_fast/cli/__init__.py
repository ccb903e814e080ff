"""The ``mtrobust-fast`` command line: one table of sub-commands, each implemented in its own module.

Each module named below defines ``add_arguments(parser)`` and ``run(args) -> int``; an entry "module:NAME" uses
that module's ``add_NAME_arguments`` and ``run_NAME`` instead (several sub-commands in one module).
"""
import argparse
import importlib
import os
import re
import sys
import warnings

import mtrobust_fast

# (words of the sub-command, module implementing it, one-line help)
COMMANDS = [
    (("quickstart",), "mtrobust_fast.cli.quickstart", "the main job in miniature: synthesise, train, attack, print Table 1"),
    (("data", "synth"), "mtrobust_fast.cli.data:synth", "write a synthetic Taskonomy dataset"),
    (("data", "synth-objects"), "mtrobust_fast.cli.data:synth_objects", "write a synthetic object-classification dataset"),
    (("train",), "mtrobust_fast.cli.train", "train a multi-task model or a classifier, clean or adversarially"),
    (("attack",), "mtrobust_fast.cli.attack", "attack a checkpoint's model and report its vulnerability"),
    (("import-checkpoint",), "mtrobust_fast.cli.import_checkpoint",
     "convert an MTRobust / AAAI'22 Taskonomy checkpoint into this project's format"),
    (("sweep",), "mtrobust_fast.cli.sweep", "run a resumable models x attacks x attacked-sets sweep into one table"),
    (("select",), "mtrobust_fast.cli.select", "rank auxiliary tasks by cheap surrogates; their correlation with full cost"),
    (("report",), "mtrobust_fast.cli.report", "figures and a Markdown summary of a results table"),
    (("complexity",), "mtrobust_fast.cli.complexity", "parameters and MACs per architecture and task set"),
    (("analyze", "cka"), "mtrobust_fast.cli.analyze:cka", "linear CKA between checkpoints' encoder features"),
    (("analyze", "landscape"), "mtrobust_fast.cli.analyze:landscape",
     "input-space loss landscape along the adversarial and a random direction"),
    (("analyze", "paired"), "mtrobust_fast.cli.analyze:paired",
     "paired tests between two attack runs on the same images (two models, or two attacks)"),
    (("analyze", "delta-p"), "mtrobust_fast.cli.analyze:delta_p",
     "LibMTL's delta_p: a multi-task model's mean relative improvement over single-task baselines"),
]


def chosen_command(argv):
    """The words of the table entry that ``argv`` starts with, or None."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return next((entry for entry, _, _ in COMMANDS if tuple(words[:len(entry)]) == entry), None)


def build_parser(chosen=None):
    """The parser of every command; only the ``chosen`` command's module is imported and adds its arguments
    (the others show in help and choices), so a light command does not pay for torch."""
    parser = argparse.ArgumentParser(prog="mtrobust-fast", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"mtrobust-fast {mtrobust_fast.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for words, module_name, help_text in COMMANDS:
        parent = subparsers
        for depth, word in enumerate(words[:-1]):
            key = words[: depth + 1]
            if key not in groups:
                group = parent.add_parser(word, help=f"{word} commands")
                groups[key] = group.add_subparsers(dest=f"{word}_command", required=True, metavar="COMMAND")
            parent = groups[key]
        sub = parent.add_parser(words[-1], help=help_text, description=help_text)
        if words == chosen:
            module_path, _, name = module_name.partition(":")
            module = importlib.import_module(module_path)
            getattr(module, f"add_{name}_arguments" if name else "add_arguments")(sub)
            sub.set_defaults(_run=getattr(module, f"run_{name}" if name else "run"))
    return parser


# Every command runs with a passive OpenMP wait policy unless OMP_WAIT_POLICY is set: on a 2-core machine shared
# with other work it made training steps about 2x faster (1.7-2.0 s vs 0.86-0.92 s per ResNet-18 step, batch 32)
# and an attack 29 s instead of 49-68 s, while on an idle machine it costs about 20 %. It only takes effect when
# set before torch is imported, so it is set before any command module is.
DESCRIPTION = "Attack, train and compare multi-task vision models for adversarial robustness."
EPILOG = """Start with `mtrobust-fast quickstart` (synthesise data, train, attack, print Table 1; 4 to 10
minutes on 2 CPU cores). `mtrobust-fast COMMAND --help` describes each command. OpenMP threads wait passively (they yield
the CPU between parallel regions, much faster on a busy machine); export OMP_WAIT_POLICY=ACTIVE for about 20 %
more speed on an idle one."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_python_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):
    """Our own warnings read as one "warning: ..." line on the command line; others keep Python's format."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def main(argv=None):
    warnings.formatwarning = _format_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = chosen_command(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser(chosen).parse_args(argv)
    try:
        return args._run(args)
    except (MemoryError, RuntimeError) as error:  # one rule for every command: running out of memory is one line
        message = out_of_memory(error)
        if message is None:
            raise
        print(f"mtrobust-fast {' '.join(chosen or ())}: error: {message}", file=sys.stderr)
        return 2


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Unable to allocate")


def out_of_memory(error):
    """The one line for an allocation that failed (torch's CPU or CUDA allocator, numpy), or None."""
    text = str(error)
    if not isinstance(error, MemoryError) and not any(marker in text for marker in _OUT_OF_MEMORY):
        return None
    size = re.search(r"allocate (\d+) bytes", text)
    wanted = f" ({int(size.group(1)) / 2 ** 30:.1f} GiB at once)" if size else \
        (f" ({m.group(1)})" if (m := re.search(r"allocate ([\d.]+ [KMGT]iB)", text)) else "")
    return (f"out of memory{wanted}: lower --size, --batch-size or --images (a size much larger than the data's "
            f"own is rarely meant)")
