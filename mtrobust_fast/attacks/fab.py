"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), AutoAttack's third member: a
minimum-norm attack that walks to the decision boundary between the true class y and a target class t by
projecting onto its local linearisation, biased towards the original image so that the point found stays close.

At the current point x (x_0 = the clean image x°), with f(x) = z_y(x) − z_t(x) and w = ∇f(x), the boundary is
approximated by the hyperplane {z : f(x) + w·(z − x) = 0}. Let d = the smallest-norm step from x onto that
hyperplane that stays in the image box, and d° the same from x°. The next point is

    x ← clip((1 − a)·(x + η·d) + a·(x° + η·d°)),   a = min(‖d‖ / (‖d‖ + ‖d°‖), a_max)

(η = 1.05 overshoots the boundary slightly, a_max = 0.1). Whenever x is misclassified it is kept if it is the
closest to x° so far, and x steps back towards x°: x ← (1 − β)·x° + β·x (β = 0.9), so the walk keeps shrinking
the perturbation. The smallest-norm steps onto a hyperplane inside a box have closed forms up to one scalar,
found exactly by sorting: for L2, d_i = clip(λ·w_i, low_i, high_i); for L∞, d_i = sign(c·w_i)·min(r, room_i).
Target classes are the most likely wrong ones of the clean image, tried in turn on the points still robust.

As an attack with a budget it returns, per image, the closest misclassified point found if its distance to x° is
at most eps, and x° itself otherwise. Its steps are projections onto linearised boundaries, not steps of a
fixed size inside a ball, so they do not go through the fused attack step; the result is projected onto the
eps-ball and the box with the fused projection.
"""
import torch

from mtrobust_fast import ops
from mtrobust_fast.attacks.base import ATTACKS, STEPS, Attack

BACKTRACK = 0.9
OVERSHOOT = 1.05
ALPHA_MAX = 0.1


def project_onto_hyperplane(w, c, low, high, norm):
    """Per row, the smallest-norm d [R, N] with w·d = c and low ≤ d ≤ high (low ≤ 0 ≤ high), or, when the box
    cannot reach the hyperplane, the box point that gets closest to it along w. ``w``, ``low``, ``high``
    [R, N]; ``c`` [R]. Computed in float64, exactly: w·d(s) is piecewise linear in the scalar s of the closed
    form (λ for L2, r for L∞) with one breakpoint where each coordinate reaches the box, so sorting the
    breakpoints finds the segment that holds c and the value of s in it."""
    w, c, low, high = w.double(), c.double(), low.double(), high.double()
    sign = torch.where(c >= 0, 1.0, -1.0).to(w)[:, None]
    c = c.abs()  # solve w·d' = |c| ≥ 0 for d' = sign(c)·d, whose box is the mirrored one where c < 0
    low, high = torch.where(sign > 0, low, -high), torch.where(sign > 0, high, -low)
    if norm == "l2":  # d_i = clip(λ·w_i, low_i, high_i): coordinate i saturates at λ_i, contributing w_i·bound_i
        bound = torch.where(w > 0, high, low)
        slope = w * w
        breaks = torch.where(w != 0, bound / torch.where(w != 0, w, 1.0), torch.inf)
    else:  # d_i = sign(w_i)·min(r, room_i): coordinate i saturates at r = room_i, contributing |w_i|·room_i
        room = torch.where(w >= 0, high, -low)
        slope = w.abs()
        breaks = torch.where(w != 0, room, torch.inf)
    order = breaks.argsort(dim=1)
    breaks, slope = breaks.gather(1, order), slope.gather(1, order)
    finite = torch.isfinite(breaks)
    breaks = torch.where(finite, breaks, 0.0)
    saturated = slope * breaks  # each coordinate's contribution once saturated
    before = saturated.cumsum(1) - saturated  # Σ_{j<k} of the saturated contributions
    remaining = slope.flip(1).cumsum(1).flip(1)  # Σ_{j≥k} of the slopes
    reach = torch.where(finite, before + breaks * remaining, torch.inf)  # w·d at breakpoint k
    enough = reach >= c[:, None]
    k = enough.float().argmax(1, keepdim=True)  # the first breakpoint that reaches c
    scale = ((c[:, None] - before.gather(1, k)) / remaining.gather(1, k).clamp_min(1e-300))[:, 0]
    top = torch.where(finite, breaks, 0.0).amax(1)  # every coordinate saturated: the box's best effort
    scale = torch.where(enough.any(1) & (c > 0), scale, torch.where(c > 0, top, 0.0))
    if norm == "l2":
        d = torch.maximum(torch.minimum(scale[:, None] * w, high), low)
    else:
        d = torch.sign(w) * torch.minimum(scale[:, None].expand_as(room), room)
    return d * sign


def _norm(delta, norm):
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)


@ATTACKS.register("fab")
class FAB(Attack):
    """FAB-T on one classification head (``target_tasks``), L∞ or L2: ``steps`` iterations (100 in AutoAttack) per
    target class, ``target_classes`` targets (9), ``restarts`` starts per target (the first at the clean image,
    the others at a random point at half the best distance found so far, or half of eps), each target and each
    start only on the points not yet fooled within eps. See the module docstring for the algorithm.

    ``targeted=False`` is the untargeted FAB of AutoAttack's "plus" version: no target list; at every iteration
    each sample takes the class k ≠ y whose linearised boundary is nearest, the smallest |z_y − z_k| / ‖∇(z_y −
    z_k)‖_* (‖·‖_* the dual norm: L1 for L∞, L2 for L2). That needs every logit's input gradient, one backward
    per class per iteration; ``restarts`` as above."""

    default_random_start = False
    classifier_only = True
    settings = (STEPS,)
    refused = {**Attack.refused, "alpha": "fab has no step size (it projects onto the linearised boundary)",
               "dense_loss": "fab attacks one classification head"}

    def __init__(self, model, tasks=None, *, steps=100, target_classes=9, restarts=1, targeted=True, **kwargs):
        super().__init__(model, tasks, steps=steps, **kwargs)
        if len(self.target_tasks) != 1:
            raise ValueError(f"fab attacks one classification head; got target_tasks {self.target_tasks}")
        if isinstance(target_classes, bool) or not isinstance(target_classes, int) or target_classes < 1:
            raise ValueError(f"target_classes must be an integer >= 1, got {target_classes!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        self.target_classes, self.fab_restarts, self.targeted = target_classes, restarts, bool(targeted)

    def _logits(self, x, grad=False):
        (name,) = self.target_tasks
        spec = next(s for s in self.specs if s.name == name)
        with torch.set_grad_enabled(grad):
            return spec.output(self._head_outputs(x, [name])).float()

    def _optimize(self, x, rows):
        x0, labels = rows.x0, rows.targets[self.target_tasks[0]]
        logits = self._logits(x0)
        if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.is_floating_point():
            raise ValueError(f"fab needs a classification head (logits [B, K], class labels [B]); "
                             f"{self.target_tasks[0]!r} gives {tuple(logits.shape)} and labels {tuple(labels.shape)}")
        ranked = logits.argsort(dim=1, descending=True)
        best = x0.clone()
        best_norm = torch.full((x0.shape[0],), float("inf"), dtype=torch.float64, device=x0.device)
        eps = rows.eps.double()
        robust = logits.argmax(1) == labels
        best_norm[~robust] = 0.0  # already misclassified: the clean image is the answer
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)
        ranks = range(1, min(self.target_classes, logits.shape[1] - 1) + 1) if self.targeted else [None]
        for rank in ranks:
            for restart in range(self.fab_restarts):
                index = (best_norm > eps).nonzero().flatten()  # each start only on the points not yet fooled
                if index.numel() == 0:
                    break
                targets = None if rank is None else ranked[index, rank]  # robust points rank their class first
                start = x0[index] if restart == 0 else self._random_start(x0[index], best_norm[index], eps[index], gen)
                found, norm = self._walk(start, x0[index], labels[index], targets)
                better = norm < best_norm[index]
                best[index[better]] = found[better]
                best_norm[index[better]] = norm[better]
        inside = best_norm <= eps * (1 + 1e-6)
        result = torch.where(inside.view(-1, *([1] * (x0.dim() - 1))), best, x0)
        ops.project_prepared_(result, x0, rows.eps, self.norm, self.lo, self.hi)
        return result

    def _random_start(self, x0, best_norm, eps, gen):
        radius = torch.where(torch.isfinite(best_norm), torch.minimum(best_norm, eps), eps) / 2
        noise = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) * 2 - 1
        scaled = noise / _norm(noise, self.norm).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
        return (x0 + scaled * radius.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))).clamp(self.lo, self.hi)

    def _linearise(self, x, labels, targets):
        """f = z_y − z_t and w = ∇f at ``x`` for the target classes ``targets``, or, with ``targets`` None, for
        each sample's class t ≠ y with the nearest linearised boundary |f| / ‖w‖_* (one backward per class)."""
        xg = x.detach().requires_grad_(True)
        logits = self._logits(xg, grad=True)
        if targets is not None:
            f = logits.gather(1, labels[:, None])[:, 0] - logits.gather(1, targets[:, None])[:, 0]
            (w,) = torch.autograd.grad(f.sum(), xg)
            return f.detach(), w
        classes = logits.shape[1]
        grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=k < classes - 1)[0]
                             for k in range(classes)], dim=1)  # [n, K, ...]
        rows = torch.arange(x.shape[0], device=x.device)
        f_all = logits.detach()[rows, labels][:, None] - logits.detach()  # [n, K]
        w_all = grads[rows, labels][:, None] - grads
        dual = w_all.flatten(2).abs().sum(2) if self.norm == "linf" else w_all.flatten(2).norm(dim=2)
        distance = f_all.abs() / dual.clamp_min(1e-12)
        distance[rows, labels] = float("inf")
        nearest = distance.argmin(1)
        return f_all[rows, nearest], w_all[rows, nearest]

    def _walk(self, x, x0, labels, targets):
        """``steps`` FAB iterations towards ``targets`` (None: the nearest boundary at each iteration) from ``x``:
        (closest misclassified point, its distance; inf where none was found)."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        best, best_norm = x0.clone(), torch.full((x0.shape[0],), float("inf"), dtype=torch.float64, device=x0.device)
        flat0 = x0.flatten(1).double()
        for _ in range(self.steps):
            f, w = self._linearise(x, labels, targets)
            self._record(f[:, None])
            flat, w = x.flatten(1).double(), w.flatten(1).double()
            f = f.double()
            d = project_onto_hyperplane(w, -f, self.lo - flat, self.hi - flat, self.norm)
            d0 = project_onto_hyperplane(w, -f - (w * (flat0 - flat)).sum(1), self.lo - flat0, self.hi - flat0,
                                         self.norm)
            size, size0 = _norm(d, self.norm), _norm(d0, self.norm)
            a = torch.clamp(size / (size + size0).clamp_min(1e-300), max=ALPHA_MAX)[:, None]
            step = ((1 - a) * (flat + OVERSHOOT * d) + a * (flat0 + OVERSHOOT * d0)).clamp(self.lo, self.hi)
            x = step.to(x.dtype).view_as(x)
            fooled = self._logits(x).argmax(1) != labels
            norm = _norm((x - x0).double(), self.norm)
            better = fooled & (norm < best_norm)
            best = torch.where(better.view(shape), x, best)
            best_norm = torch.where(better, norm, best_norm)
            x = torch.where(fooled.view(shape), (1 - BACKTRACK) * x0 + BACKTRACK * x, x)
        return best, best_norm

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """One attacked set only (its single classification head)."""
        if subsets is None or len(subsets) != 1 or self.task_names(subsets[0]) != self.target_tasks:
            raise ValueError(f"fab attacks only its one head {self.target_tasks}; give that single set")
        return self(x, targets, masks, sample_ids)[None]
