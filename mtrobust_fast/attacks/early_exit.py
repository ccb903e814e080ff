"""Exact early exit for deterministic sign-step attacks.

The idea (Doldo et al., "Stop Walking in Circles!", CVPR 2025): an L∞ attack that takes sign steps of a fixed size
and clips to the ball, run on a point it cannot break, soon walks back onto an iterate it has already visited.
When the next iterate is a function of the current one alone, the walk from then on repeats with that period, so
the rest of the run is known without computing it.

Here: when a row's iterate after step ``t`` equals its iterate after step ``t - p``, its iterate after the last
of the ``S`` steps is the one ``(S - t) mod p`` steps after ``t``. The row runs those few steps more (fewer than
``p``) and then leaves the batch, holding exactly the final iterate of the full run; the rows still walking run
on as a smaller batch. Every period ``p`` is detected (up to ``S - 1``): each iterate's fingerprint is kept per
row, and a repeat is a fingerprint seen before. The fingerprint (two 64-bit wrapping sums over the row's stored
bits, see :func:`mtrobust_fast.ops.attack_step_`) is computed by the fused op in the same pass that writes the
iterate; two different iterates share one with probability about 2^-128.

An attack whose step also depends on the step count through a schedule of period ``q`` (the cyclic strategy:
task ``t mod n`` at step ``t``) passes ``periods``: a repeat then counts only between iterates at the same phase
``t mod q``, and only once every phase has been taken once (the strategy's per-task scales are all set by then).

A success stop (``stop_on_success``, classification heads) ends a row at its first iterate that every attacked
head gets wrong: the step leaves that iterate unchanged and sets ``attack._stopped`` for the rows concerned. That
is not exact: the row's final point differs from the full run's, and the robust accuracy can only be lower or
equal.

What makes the cycle exit exact is the caller's business (:attr:`Attack.exits_early`): a model in eval mode whose row
losses do not depend on chance or on which other rows share the batch. The batch never shrinks below two rows
(a finished row is carried as padding and its result discarded), since some kernels compute a batch of one row
differently from a larger one. Deciding which rows leave reads each step's fingerprints (16 bytes a row) back to
the host: the one host read in a step loop, and only while rows can still leave.
"""
import numpy as np
import torch


class CycleTracker:
    """Per-row fingerprints of the iterates after each step, and the step after which each row is finished."""

    def __init__(self, steps, periods):
        self.steps = steps
        self.periods = periods  # [R] the schedule's period per row (1: a step depends on the iterate alone)
        self.seen = [dict() for _ in range(len(periods))]  # (fingerprint, phase) -> step after which it stood there
        self.finish = np.full(len(periods), steps, dtype=np.int64)  # the row's last step
        self.cycle = np.zeros(len(periods), dtype=np.int64)  # the detected period of the walk (0: none)

    def update(self, active, fingerprints, number):
        """Record the fingerprints ``[A, 2]`` (host) of the ``active`` rows after step ``number`` (1-based); a row
        whose fingerprint repeats gets its period and its last step (``finish``)."""
        for row, print_ in zip(active.tolist(), map(tuple, fingerprints.tolist())):
            period = int(self.periods[row])
            if self.cycle[row] or number < period:
                continue
            key = (print_, number % period)
            earlier = self.seen[row].get(key)
            if earlier is None:
                self.seen[row][key] = number
            else:
                self.cycle[row] = number - earlier
                self.finish[row] = number + (self.steps - number) % self.cycle[row]

    def stop(self, rows, number):
        """The ``rows`` are finished after step ``number`` (a success stop)."""
        self.finish[rows] = np.minimum(self.finish[rows], number)


def _merge(full, part, active, count, total):
    """``full`` [total, ...] (None: zeros) with the rows ``active`` replaced by the first ``count`` rows of ``part``."""
    if part is None:
        return full
    full = part.new_zeros((total, *part.shape[1:])) if full is None else full.clone()
    full[active] = part[:count]
    return full


def iterate(attack, x, rows, step, state=(), periods=None):
    """Run ``attack.steps`` steps ``state = step(x, rows, state, number)`` (``number`` counts from 0) on ``x`` in
    place, leaving finished rows out of later steps when ``attack.exits_early`` (cycles) or the attack stops on
    success. ``state``: a tuple of None or per-row tensors ``[R, ...]`` carried from step to step; ``periods``:
    None or an int64 tensor [R], the period of each row's step schedule (see the module docstring). Returns
    ``x``."""
    total = x.shape[0]
    cycles, success = attack.exits_early, attack.stop_on_success
    if not (cycles or success) or total == 0:
        for number in range(attack.steps):
            state = step(x, rows, state, number)
        attack.cost.add_steps(attack.steps * total, 0, 0)
        return x
    periods = np.ones(total, dtype=np.int64) if periods is None else periods.cpu().numpy()
    tracker = CycleTracker(attack.steps, periods)
    active = torch.arange(total, device=x.device)
    stepped = 0  # row-steps run, padding included
    for number in range(attack.steps):
        count = active.numel()
        run = active
        if count == 1:  # pad with a finished row: a batch of one row may be computed differently
            finished = torch.ones(total, dtype=torch.bool, device=x.device)
            finished[active] = False
            run = torch.cat([active, finished.nonzero().flatten()[:1]])
        whole = run.numel() == total
        stepped += run.numel()
        part = x if whole else x[run]
        if cycles:
            attack._fingerprint = torch.zeros(run.numel(), 2, dtype=torch.int64, device=x.device)
        try:
            new = step(part, rows if whole else rows.select(run),
                       state if whole else tuple(None if s is None else s[run] for s in state), number)
        finally:
            prints, attack._fingerprint = attack._fingerprint, None
            stopped, attack._stopped = attack._stopped, None
        if whole:
            state = new
        else:
            x[active] = part[:count]
            state = tuple(_merge(f, p, active, count, total) for f, p in zip(state, new))
        rows_now = active.cpu().numpy()
        if cycles:
            tracker.update(rows_now, prints[:count].cpu().numpy(), number + 1)
        if stopped is not None:
            tracker.stop(rows_now[stopped[:count].cpu().numpy()], number + 1)
        done = tracker.finish[rows_now] <= number + 1
        if done.any():
            active = active[torch.from_numpy(~done).to(x.device)]
            if active.numel() == 0:
                break
    attack.cost.add_steps(stepped, int((attack.steps - tracker.finish).sum()), int((tracker.finish < attack.steps).sum()))
    return x
