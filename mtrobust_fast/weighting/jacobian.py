"""Gradient-based multi-task weighting with torchjd: per-task gradients of the shared encoder, one aggregate.

Every head receives the gradient of the losses that depend on it (its own task's; heads are not aggregated), and
the shared parameters receive the Jacobian, one row per loss, which the chosen aggregator (MGDA, UPGrad,
PCGrad, ...) turns into one gradient (``jac_to_grad``). When every loss depends on the encoder only through the
shared representation, ``torchjd.autojac.mtl_backward`` builds the Jacobian from it (each head is
back-propagated once); when a term does not factor that way (the curvature regulariser differentiates input
gradients), ``torchjd.autojac.backward`` differentiates each loss through the whole graph instead. Task weights multiply the
losses first, so a negative weight still turns a task into one to worsen. "ew" (``Sum``) is exactly training
on the summed weighted losses; "mean" divides the encoder's gradient by the number of tasks.

AMP: the losses are scaled by the ``GradScaler`` before the backward; every aggregator here returns a gradient
proportional to a uniform scale of the Jacobian, so unscaling afterwards is exact up to rounding. DDP: each
process would aggregate its own Jacobian and the averaged result is not the aggregate of the averaged Jacobian;
torchrun training with these weightings is refused (static weights work under DDP).
"""
import functools

import torch

from mtrobust_fast.weighting.base import WEIGHTINGS, Weighting

# method -> its torchjd aggregator, built from the module ``torchjd.aggregation`` and the number of tasks
# (torchjd is imported only when a method is built, so reading the registry stays cheap).
AGGREGATORS = {
    "ew": lambda agg, n: agg.Sum(),  # equal weights: the gradient of the summed losses, as the GAT code's "EW"
    "mean": lambda agg, n: agg.Mean(),
    "mgda": lambda agg, n: agg.MGDA(),
    "upgrad": lambda agg, n: agg.UPGrad(),
    "pcgrad": lambda agg, n: agg.PCGrad(),
    "imtlg": lambda agg, n: agg.IMTLG(),
    "aligned_mtl": lambda agg, n: agg.AlignedMTL(),
    "dualproj": lambda agg, n: agg.DualProj(),
    "graddrop": lambda agg, n: agg.GradDrop(),
    "cagrad": lambda agg, n: agg.CAGrad(c=0.5),
    "nashmtl": lambda agg, n: agg.NashMTL(n_tasks=n),
}
OPTIONAL = {"cagrad": "torchjd[cagrad]", "nashmtl": "torchjd[nash_mtl]"}


class JacobianWeighting(Weighting):
    """Aggregate the shared encoder's per-task gradients with a torchjd aggregator (``name``); ``weights``
    ``{task: w}`` scale the losses first (1 for every task when None)."""

    needs_model = True

    def __init__(self, name, weights):
        from torchjd import aggregation

        if name not in AGGREGATORS:
            raise ValueError(f"weighting: unknown method {name!r}; choose one of {', '.join(AGGREGATORS)}")
        self.name = name
        self.weights = {task: float(w) for task, w in weights.items()}
        try:
            self.aggregator = AGGREGATORS[name](aggregation, len(self.weights))
        except ImportError as error:
            raise ValueError(f"weighting: {self.name} needs its optional dependencies: pip install "
                             f"\"{OPTIONAL[self.name]}\" ({error})") from None

    def combine(self, values):
        return sum(self.weights[name] * value for name, value in values.items())

    def backward(self, losses, *, scaler=None, model=None, features=None):
        from torchjd.autojac import backward, jac_to_grad, mtl_backward

        self._check(losses, list(self.weights))
        if model is None or not hasattr(model, "shared_parameters"):
            raise ValueError(f"weighting {self.name} needs the model and its shared_parameters()")
        weighted = [self.weights[name] * losses[name] for name in self.weights]
        scaled = weighted if scaler is None else [scaler.scale(loss) for loss in weighted]
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        if features:
            mtl_backward(scaled, features=features, shared_params=shared)
        else:
            ids = {id(p) for p in shared}
            heads = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
            torch.autograd.backward(sum(scaled), inputs=heads, retain_graph=True)
            backward(scaled, inputs=shared)
        jac_to_grad(shared, self.aggregator)
        return torch.stack([loss.detach() for loss in weighted]).sum()


for _method in AGGREGATORS:
    WEIGHTINGS.register(_method)(functools.partial(JacobianWeighting, _method))
