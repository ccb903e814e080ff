"""Square attack (Andriushchenko et al., ECCV 2020): a score-based random search that needs no gradient, so it
finds adversarial points where gradients are useless (masked, zero or noisy), AutoAttack's fourth member."""
import math

import torch

from mtrobust_fast.attacks.base import Attack

_project_ = torch.ops.mtrobust_fast.project_
# Fractions of the 10 000-query schedule at which the square's area p halves (the paper's schedule).
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init, query, queries):
    """The area fraction p of the square at ``query`` of ``queries`` (the schedule rescaled to 10 000)."""
    scaled = int(query / queries * 10000)
    return p_init / 2 ** sum(scaled > h for h in HALVINGS)


def margin(logits, labels):
    """z_y − max_{k≠y} z_k per sample: > 0 while the sample is classified correctly."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - others


class Square(Attack):
    """Square attack, L∞: start from vertical stripes of ±eps; then, ``steps`` times (the query budget, 5000 by
    default), draw for every still-correct sample a random square window of area p·H·W (p shrinking on the
    paper's schedule from ``p_init``) and set the perturbation inside it to ±eps per channel; keep the change
    where the margin z_y − max_{k≠y} z_k went down. One forward pass per query for the samples still correct;
    no gradient. Works on one classification head (``target_tasks``) with class labels; L2 is not offered."""

    default_random_start = False
    settings = ("steps",)
    refused = {**Attack.refused, "alpha": "square has no step size (it searches at the ball's corners)",
               "dense_loss": "square attacks one classification head"}

    def __init__(self, model, tasks=None, *, steps=5000, p_init=0.8, **kwargs):
        super().__init__(model, tasks, steps=steps, **kwargs)
        if self.norm != "linf":
            raise ValueError("square: only the L∞ version is implemented; use norm='linf'")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        if len(self.target_tasks) != 1:
            raise ValueError(f"square attacks one classification head; got target_tasks {self.target_tasks}")
        self.p_init = float(p_init)

    def _margin(self, points, labels):
        (name,) = self.target_tasks
        spec = next(s for s in self.specs if s.name == name)
        with torch.no_grad():
            logits = spec.output(self.model(points))
        if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.is_floating_point():
            raise ValueError(f"square needs a classification head (logits [B, K], class labels [B]); {name!r} "
                             f"gives {tuple(logits.shape)} outputs and labels {tuple(labels.shape)}")
        return margin(logits.float(), labels)

    def _optimize(self, x, rows):
        """The random search from the stripes start (``x`` is the clean batch: square has no random start)."""
        x0, labels = rows.x0, rows.targets[self.target_tasks[0]]
        count, channels, height, width = x0.shape
        eps = rows.eps.to(x0.dtype).view(-1, 1, 1, 1)
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)

        def draw(*shape):
            return torch.randint(0, 2, shape, generator=gen, device=x0.device).to(x0.dtype) * 2 - 1

        adv = (x0 + eps * draw(count, channels, 1, width)).clamp(self.lo, self.hi)
        best = self._margin(adv, labels)
        lines_y = torch.arange(height, device=x0.device)[None, :]
        lines_x = torch.arange(width, device=x0.device)[None, :]
        for query in range(self.steps):
            index = (best > 0).nonzero().flatten()
            if index.numel() == 0:
                break
            fraction = square_fraction(self.p_init, query, self.steps)
            side = max(1, min(height - 1, round(math.sqrt(fraction * height * width))))
            top = torch.randint(0, height - side + 1, (index.numel(), 1), generator=gen, device=x0.device)
            left = torch.randint(0, width - side + 1, (index.numel(), 1), generator=gen, device=x0.device)
            window = (((lines_y >= top) & (lines_y < top + side))[:, None, :, None]
                      & ((lines_x >= left) & (lines_x < left + side))[:, None, None, :])
            signed = eps[index] * draw(index.numel(), channels, 1, 1)
            candidate = (x0[index] + torch.where(window, signed, adv[index] - x0[index])).clamp(self.lo, self.hi)
            value = self._margin(candidate, labels[index])
            better = value < best[index]
            adv[index[better]] = candidate[better]
            best[index[better]] = value[better]
            self._record(best[:, None])
        _project_(adv, x0, rows.eps, self.norm, self.lo, self.hi)
        return adv

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """One attacked set only (its single classification head)."""
        if subsets is None or len(subsets) != 1 or self.task_names(subsets[0]) != self.target_tasks:
            raise ValueError(f"square attacks only its one head {self.target_tasks}; give that single set")
        return self(x, targets, masks, sample_ids)[None]
