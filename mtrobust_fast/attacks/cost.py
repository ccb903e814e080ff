"""What an attack spent: forward and backward passes per row, steps run and saved by early exit, wall time.

Passes are counted where they happen rather than where an attack says it makes them: while an attack runs, a hook
on the model's entry module (a :class:`~mtrobust_fast.models.multitask.MultiTaskModel`'s encoder, or the model
itself) adds the rows of every forward pass, and a hook on each input that requires a gradient adds its rows
whenever a backward pass reaches it. So a composite attack's total includes its members', the early-exit probe
and the scoring passes are in, and a row that left the batch early costs nothing more.
"""
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from mtrobust_fast.models.multitask import MultiTaskModel


@dataclass
class Cost:
    """Totals over every call of one attack object. ``rows``: rows attacked (an image once per attacked set);
    ``forward_rows`` / ``backward_rows``: rows through the model's forward / input-gradient backward;
    ``row_steps``: steps run summed over rows, by the attacks that exit early (padding rows included);
    ``steps_saved``: steps those rows did not need to run; ``rows_exited``: rows that left early."""

    rows: int = 0
    forward_rows: int = 0
    backward_rows: int = 0
    row_steps: int = 0
    steps_saved: int = 0
    rows_exited: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        self._depth = 0  # counting() blocks open: only the outermost counts (an attack that calls itself)

    def since(self, earlier):
        """What was spent after the snapshot ``earlier`` (a copy of this cost taken before)."""
        return Cost(**{k: getattr(self, k) - getattr(earlier, k) for k in asdict(self)})

    def add_steps(self, run, saved, exited):
        self.row_steps += run
        self.steps_saved += saved
        self.rows_exited += exited

    def as_dict(self):
        """The totals and the passes per attacked row (None before any row was attacked)."""
        out = asdict(self)
        out["forward_per_row"] = self.forward_rows / self.rows if self.rows else None
        out["backward_per_row"] = self.backward_rows / self.rows if self.rows else None
        return out

    @contextmanager
    def counting(self, model, rows):
        """Count the passes through ``model`` and the wall time while the block runs, for ``rows`` attacked rows.
        A block inside another of the same cost adds nothing of its own."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        entry = model.encoder if isinstance(model, MultiTaskModel) else model
        mark = f"_cost_{id(self)}"

        def on_backward(grad):
            self.backward_rows += grad.shape[0]

        def on_forward(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            self.forward_rows += x.shape[0]
            if x.requires_grad and not getattr(x, mark, False):
                setattr(x, mark, True)  # one count per backward, however many forwards share the input
                x.register_hook(on_backward)

        handle = entry.register_forward_pre_hook(on_forward)
        start = time.perf_counter()
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            handle.remove()
            self.rows += rows
            self.seconds += time.perf_counter() - start
