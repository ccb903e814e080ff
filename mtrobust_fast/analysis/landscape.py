"""Loss landscapes in input space: each task's loss at x + a·u + b·v around a batch of images, with u the
adversarial direction (the sign of the input gradient of the attacked tasks' summed loss, as an L∞ attack's first
step) and v a random sign direction (Rademacher, seeded); a and b run over [−radius, radius] in pixel units, so
a = 8/255 is one full L∞ step of 8/255. Points are clipped to the valid image range [0, 1], as an attack's would
be. Flat, low surfaces along u mean a robust model; a sharp rise along u but not v means an attack finds what
random noise does not.
"""
import torch
from tqdm import tqdm

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.tasks import opmath


def directions(model, x, targets, masks, records, attacked, seed=0):
    """(u, v) [B, ...]: the sign of ∇ₓ Σ_{t∈attacked} L_t, and a random ±1 direction drawn from ``seed``."""
    xg = x.detach().requires_grad_(True)
    outputs = model(xg)
    by_name = {r.name: r for r in records}
    loss = sum(by_name[n].loss(opmath(outputs[n]), targets[n], masks.get(n)).sum() for n in attacked)
    (grad,) = torch.autograd.grad(loss, xg)
    generator = torch.Generator().manual_seed(seed)
    random = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
    return grad.sign(), random


@torch.no_grad()
def surface(model, x, targets, masks, records, u, v, a_values, b_values, bar=None):
    """Mean per-task loss over the batch at every (a, b): ``{task: [len(a_values), len(b_values)]}`` (float64);
    ``bar``: a progress bar advanced once per forward pass."""
    out = {r.name: torch.empty(len(a_values), len(b_values), dtype=torch.float64) for r in records}
    for i, a in enumerate(a_values):
        for j, b in enumerate(b_values):
            outputs = model((x + a * u + b * v).clamp(0, 1))
            for r in records:
                out[r.name][i, j] = r.loss(opmath(outputs[r.name]), targets[r.name], masks.get(r.name)).double().mean()
            if bar is not None:
                bar.update()
    return out


def landscape(model, x, targets, masks, tasks, attacked=None, radius=16 / 255, points=21, seed=0, two_d=True,
              progress=False):
    """The landscape of ``model`` around the batch ``x``: ``{"a": [points], "b": [points] or [0], "adversarial":
    {task: [points]} (b = 0), "random": {task: [points]} (a = 0), "surface": {task: [points, points]} (with
    ``two_d``)}``. ``tasks``: records or names of the evaluated tasks; ``attacked``: the tasks whose loss gives
    the adversarial direction (default all). ``progress``: a bar over the forward passes."""
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points must be an odd number >= 3 (so that 0 is on the grid), got {points}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    records = [task_registry.record(t) for t in tasks]
    attacked = [r.name for r in records] if attacked is None else list(attacked)
    was_training = model.training
    model.eval()
    bar = tqdm(total=2 * points + (points * points if two_d else 0), desc="landscape", unit="pass",
               disable=not progress, leave=False)
    try:
        u, v = directions(model, x, targets, masks, records, attacked, seed)
        grid = torch.linspace(-radius, radius, points, dtype=torch.float64).tolist()
        zero = [0.0]
        result = {"a": grid, "b": grid if two_d else zero,
                  "adversarial": {k: s[:, 0].tolist() for k, s in surface(model, x, targets, masks, records, u, v,
                                                                          grid, zero, bar).items()},
                  "random": {k: s[0].tolist() for k, s in surface(model, x, targets, masks, records, u, v,
                                                                  zero, grid, bar).items()}}
        if two_d:
            result["surface"] = {k: s.tolist() for k, s in surface(model, x, targets, masks, records, u, v,
                                                                   grid, grid, bar).items()}
    finally:
        bar.close()
        model.train(was_training)
    return result


def draw(result, path, title="", dpi=120):
    """The landscape as one PNG: per task, the 1-D curves along u and v, and (when computed) the 2-D surface as
    filled contours with u on the horizontal axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["adversarial"])
    two_d = "surface" in result
    fig, axes = plt.subplots(len(names), 2 if two_d else 1, squeeze=False,
                             figsize=(4.2 * (2 if two_d else 1), 3.0 * len(names)))
    scale = 255.0
    a = [value * scale for value in result["a"]]
    for row, name in enumerate(names):
        ax = axes[row][0]
        ax.plot(a, result["adversarial"][name], marker=".", label="adversarial direction u")
        ax.plot(a, result["random"][name], marker=".", label="random direction v")
        ax.set_xlabel("step along the direction (/255)")
        ax.set_ylabel(f"{name} loss")
        ax.legend(fontsize=7)
        if two_d:
            ax = axes[row][1]
            b = [value * scale for value in result["b"]]
            contour = ax.contourf(a, b, list(map(list, zip(*result["surface"][name]))), levels=15, cmap="viridis")
            fig.colorbar(contour, ax=ax)
            ax.set_xlabel("along u (/255)")
            ax.set_ylabel("along v (/255)")
            ax.set_title(f"{name} loss", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
