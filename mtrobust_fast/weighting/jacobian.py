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
import torch
from torchjd import aggregation
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from mtrobust_fast.weighting.base import Weighting

AGGREGATORS = {
    "ew": aggregation.Sum,  # equal weights: the gradient of the summed losses, as the GAT code's "EW"
    "mean": aggregation.Mean,
    "mgda": aggregation.MGDA,
    "upgrad": aggregation.UPGrad,
    "pcgrad": aggregation.PCGrad,
    "imtlg": aggregation.IMTLG,
    "aligned_mtl": aggregation.AlignedMTL,
    "dualproj": aggregation.DualProj,
    "graddrop": aggregation.GradDrop,
    "cagrad": lambda: aggregation.CAGrad(c=0.5),
    "nashmtl": None,  # needs the number of tasks; built in JacobianWeighting
}
ALIASES = {"imtl": "imtlg", "pcg": "pcgrad"}
OPTIONAL = {"cagrad": "torchjd[cagrad]", "nashmtl": "torchjd[nash_mtl]"}


def canonical(name):
    name = ALIASES.get(name, name)
    if name not in AGGREGATORS:
        raise ValueError(f"weighting: unknown method {name!r}; choose static or one of "
                         f"{', '.join(sorted(set(AGGREGATORS) | set(ALIASES)))}")
    return name


class JacobianWeighting(Weighting):
    """Aggregate the shared encoder's per-task gradients with a torchjd aggregator (``name``); ``weights``
    ``{task: w}`` scale the losses first (1 for every task when None)."""

    needs_model = True

    def __init__(self, name, weights):
        self.name = canonical(name)
        self.weights = {task: float(w) for task, w in weights.items()}
        try:
            self.aggregator = aggregation.NashMTL(n_tasks=len(self.weights)) if self.name == "nashmtl" \
                else AGGREGATORS[self.name]()
        except ImportError as error:
            raise ValueError(f"weighting: {self.name} needs its optional dependencies: pip install "
                             f"\"{OPTIONAL[self.name]}\" ({error})") from None

    def combine(self, values):
        return sum(self.weights[name] * value for name, value in values.items())

    def backward(self, losses, *, scaler=None, model=None, features=None):
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
