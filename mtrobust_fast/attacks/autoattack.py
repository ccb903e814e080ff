"""AutoAttack-style cascade for a classification head (Croce & Hein, ICML 2020): several complementary attacks,
each run only on the points that every earlier one failed to fool, the per-point worst case kept.

Robust accuracy after the cascade is the fraction of points no member fooled, so it equals running every
member on every point and counting the points that survive all of them (a test checks this), at the cost of
running later members on fewer points. Members (``attacks=``):

- ``apgd-ce``: APGD on the cross-entropy; ``apgd-dlr``: APGD on the DLR loss (scale-invariant);
- ``apgd-t``: targeted APGD on the targeted DLR loss over the most likely wrong classes; ``apgd-t-malt``: the
  same over the wrong classes MALT's local linear estimate puts nearest (:func:`~mtrobust_fast.attacks.apgd.
  malt_scores`);
- ``fab-t``: the targeted minimum-norm FAB attack over the same target classes; ``fab``: untargeted FAB (the
  nearest linearised boundary at every iteration);
- ``square``: the score-based Square attack (L∞ or L2), which needs no gradient.

Versions (AutoAttack's):
- ``"standard"`` (the default without ``attacks``): APGD-CE, APGD-T, FAB-T, Square, each run once;
- ``"plus"``: APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T, with 5 restarts of APGD-CE, APGD-DLR and FAB
  (APGD's restarts are runs from new random starts, each on the points still robust; FAB's are its own random
  restarts), stronger and several times slower;
- ``"rand"``: APGD-CE and APGD-DLR with the gradient averaged over 20 passes (EOT), for models with randomness;
- ``"fast"``: a screen, not the standard: APGD-CE, then targeted APGD on the 3 wrong classes MALT ranks nearest
  (``apgd-t-malt``), on the points still robust. No FAB and no Square, so it can report a higher robust
  accuracy than the standard on models that mask gradients; use it to rank models or settings cheaply and run
  "standard" on the ones you report.
- ``"custom"`` (the default with ``attacks``): the members given in ``attacks``, each run once.
The report says which members ran. Sanity checks as AutoAttack has them warn with their reason: a model whose
outputs change between two passes on the same input (randomness: the evaluation is not reproducible and
gradient attacks are weakened; use version "rand"), a deterministic model under version "rand" (EOT only
multiplies the cost; use "standard"), outputs that are probabilities rather than logits (losses saturate), and
samples whose input gradient is exactly zero (gradient masking: gradient attacks cannot move them; Square still
can).
"""
import time
import warnings
from dataclasses import replace

import torch

from mtrobust_fast.tasks import classification as heads
from mtrobust_fast.attacks.apgd import APGD, APGDT
from mtrobust_fast.attacks.base import ATTACKS, STEPS, Attack
from mtrobust_fast.attacks.ensemble import DenseEnsemble
from mtrobust_fast.attacks.fab import FAB
from mtrobust_fast.attacks.square import Square
from mtrobust_fast.registry import Setting, integer, text

MEMBERS = ("apgd-ce", "apgd-dlr", "apgd-t", "apgd-t-malt", "fab-t", "fab", "square")
# version -> ((member, restarts), ...) in cascade order; "rand" members also average 20 passes per gradient.
VERSIONS = {
    "standard": (("apgd-ce", 1), ("apgd-t", 1), ("fab-t", 1), ("square", 1)),
    "plus": (("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5), ("square", 1), ("apgd-t", 1), ("fab-t", 1)),
    "rand": (("apgd-ce", 1), ("apgd-dlr", 1)),
    "fast": (("apgd-ce", 1), ("apgd-t-malt", 1)),
}
FAST_TARGETS = 3  # the fast screen's targets per point (MALT-ranked) unless target_classes says otherwise
STANDARD = tuple(name for name, _ in VERSIONS["standard"])
RAND_EOT = 20


VERSION = Setting("version", text, None, choices=("standard", "plus", "rand", "fast", "dense"), flag="aa-version",
                  help="AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square; the default on a classifier), "
                       "plus (also APGD-DLR and untargeted FAB, 5 restarts), rand (APGD-CE and APGD-DLR with "
                       "gradients averaged over 20 passes, for models with randomness), fast (a screen, not the "
                       "standard: APGD-CE and targeted APGD on 3 MALT-ranked classes), or dense (the ensemble for "
                       "dense multi-task heads)")


QUERIES = Setting("queries", integer, 5000, low=1,
                  help="autoattack: Square's queries per point (most of its cost on a CPU)")


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """The cascade on one classification head (``target_tasks``), L∞ or L2.

    ``steps``: iterations of each APGD and FAB member (default 100); ``queries``: Square's budget (default 5000);
    ``target_classes``: APGD-T's and FAB-T's targets (default 9; the fast screen's: 3). ``report`` accumulates, over calls, each member's robust
    accuracy after it ran and its wall time."""

    default_random_start = False
    classifier_only = True
    settings = (STEPS, VERSION, QUERIES)
    summary_key = "members"
    refused = {**Attack.refused, "alpha": "autoattack's members set their own step sizes",
               "dense_loss": "autoattack attacks one classification head (use the dense attacks for dense heads)"}

    def __new__(cls, model=None, tasks=None, *, version=None, **kwargs):
        """``version="dense"`` gives the ensemble for dense multi-task models (:class:`DenseEnsemble`)."""
        if version == "dense":
            return DenseEnsemble(model, tasks, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, tasks=None, *, version=None, attacks=None, steps=100, queries=5000,
                 target_classes=None, restarts=1, **kwargs):
        version = version or ("standard" if attacks is None else "custom")
        if version not in (*VERSIONS, "custom"):
            raise ValueError(f"version must be 'standard', 'plus', 'rand', 'fast', 'custom' or 'dense', got "
                             f"{version!r}")
        if target_classes is None:
            target_classes = FAST_TARGETS if version == "fast" else 9
        if version != "custom" and attacks is not None:
            raise ValueError(f"attacks= chooses the members of version='custom'; {version!r} runs "
                             f"{', '.join(name for name, _ in VERSIONS[version])}")
        if restarts != 1:
            raise ValueError("autoattack takes no restarts (its version sets each member's)")
        super().__init__(model, tasks, steps=steps, **kwargs)
        self.version = version
        self.members = VERSIONS[version] if attacks is None else tuple((name, 1) for name in attacks)
        self.attacks = tuple(name for name, _ in self.members)
        unknown = [a for a in self.attacks if a not in MEMBERS]
        if unknown or not self.attacks:
            raise ValueError(f"attacks must be a non-empty list of {', '.join(MEMBERS)}; got {list(self.attacks)}")
        if len(self.target_tasks) != 1:
            raise ValueError(f"autoattack attacks one classification head; got target_tasks {self.target_tasks}")
        self.queries, self.target_classes = int(queries), int(target_classes)
        self.report = {name: {"robust": 0, "seconds": 0.0} for name in self.attacks}
        self.samples = 0
        self._checked = False

    def run_subsets(self, x, targets, masks=None, subsets=None, sample_ids=None):
        """One attacked set only (its single classification head)."""
        if subsets is None or len(subsets) != 1 or self.task_names(subsets[0]) != self.target_tasks:
            raise ValueError(f"autoattack attacks only its one head {self.target_tasks}; give that single set")
        return self(x, targets, masks, sample_ids)[None]

    def summary(self):
        """{member: {"robust_accuracy", "seconds"}} over every sample attacked so far, in cascade order."""
        return {name: {"robust_accuracy": entry["robust"] / self.samples if self.samples else float("nan"),
                       "seconds": round(entry["seconds"], 3)} for name, entry in self.report.items()}

    # ---- the cascade ----

    def _member(self, name, eps, restarts=1, restart=0):
        """Member ``name``; APGD's ``restart``-th run (a new random start: seed + restart), FAB's own restarts."""
        common = dict(eps=eps, norm=self.norm, seed=self.seed + restart, deterministic=self.deterministic,
                      autocast=self.autocast, channels_last=self.channels_last, fold_batchnorm=self.fold_batchnorm,
                      lo=self.lo, hi=self.hi, model_mode=self.model_mode, target_tasks=self.target_tasks)
        head = self.target_tasks[0]
        if name == "square":
            return Square(self.model, self.specs, steps=self.queries, **common)
        if name in ("apgd-t", "apgd-t-malt"):
            return APGDT(self.model, self.specs, steps=self.steps, target_classes=self.target_classes,
                         ranking="malt" if name == "apgd-t-malt" else "logits", **common)
        if name in ("fab-t", "fab"):
            return FAB(self.model, self.specs, steps=self.steps, target_classes=self.target_classes,
                       targeted=name == "fab-t", restarts=restarts, **common)
        loss = heads.cross_entropy if name == "apgd-ce" else heads.dlr
        specs = [replace(s, loss=loss) if s.name == head else s for s in self.specs]
        return APGD(self.model, specs, steps=self.steps, eot=RAND_EOT if self.version == "rand" else 1, **common)

    def _work(self, name):
        """Row evaluations one point may cost in member ``name`` (its steps or queries, times its targets and EOT
        passes): the total a progress bar counts towards."""
        if name == "square":
            return self.queries
        targets = self.target_classes if name in ("apgd-t", "apgd-t-malt", "fab-t") else 1
        return self.steps * targets * (RAND_EOT if self.version == "rand" and name.startswith("apgd") else 1)

    def _predictions(self, points):
        spec = next(s for s in self.specs if s.name == self.target_tasks[0])
        with torch.no_grad():
            return spec.output(self.model(points))

    def _optimize(self, x, rows):
        labels = rows.targets[self.target_tasks[0]]
        logits = self._predictions(rows.x0)
        if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.is_floating_point():
            raise ValueError(f"autoattack needs a classification head (logits [B, K], class labels [B]); "
                             f"{self.target_tasks[0]!r} gives {tuple(logits.shape)} and labels {tuple(labels.shape)}")
        if not self._checked:
            self._sanity(rows.x0, labels, logits)
            self._checked = True
        adv = rows.x0.clone()
        robust = logits.argmax(1) == labels
        self.samples += labels.shape[0]
        for name, restarts in self.members:
            start = time.perf_counter()
            runs = restarts if name.startswith("apgd") else 1  # FAB restarts inside one run
            for restart in range(runs):
                index = robust.nonzero().flatten()
                if not index.numel():
                    break
                member = self._member(name, rows.eps[index].double().cpu(), restarts, restart)
                member.on_gradient = self.on_gradient
                if self.on_stage is not None:  # progress: the member, the points left, the work it may take
                    self.on_stage(f"{name}{f' run {restart + 1}/{runs}' if runs > 1 else ''}: {index.numel()} of "
                                  f"{labels.shape[0]} points robust", index.numel() * self._work(name))
                subset = member(rows.x0[index], {k: v[index] for k, v in rows.targets.items()},
                                {k: v[index] for k, v in rows.masks.items()}, sample_ids=rows.ids[index.cpu()])
                fooled = self._predictions(subset).argmax(1) != labels[index]
                adv[index[fooled]] = subset[fooled]
                robust[index[fooled]] = False
            self.report[name]["robust"] += int(robust.sum())
            self.report[name]["seconds"] += time.perf_counter() - start
        return adv

    def _sanity(self, x, labels, logits):
        again = self._predictions(x)
        random = not torch.allclose(logits, again, rtol=1e-4, atol=1e-5)
        if random and self.version != "rand":
            warnings.warn("autoattack: the model's outputs differ between two passes on the same input (randomness "
                          "in the model); robust accuracy is not reproducible and gradient attacks are weakened "
                          "(version='rand' averages the gradients over the randomness)", stacklevel=3)
        if not random and self.version == "rand":
            warnings.warn("autoattack: version='rand' is for models with randomness, and this one gives the same "
                          "outputs twice; EOT only multiplies the cost (use version='standard')", stacklevel=3)
        if bool((logits >= 0).all()) and torch.allclose(logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-4):
            warnings.warn("autoattack: the outputs sum to 1 and are non-negative: they look like probabilities, "
                          "not logits; the losses saturate and the attacks weaken (return logits)", stacklevel=3)
        xg = x.detach().clone().requires_grad_(True)
        spec = next(s for s in self.specs if s.name == self.target_tasks[0])
        with torch.enable_grad():
            loss = heads.cross_entropy(spec.output(self.model(xg)).float(), labels).sum()
            (grad,) = torch.autograd.grad(loss, xg)
        zero = int((grad.flatten(1).abs().amax(1) == 0).sum())
        if zero:
            warnings.warn(f"autoattack: {zero} of {x.shape[0]} samples have an input gradient of exactly zero "
                          f"(gradient masking, e.g. a quantised input); gradient attacks cannot move them, only "
                          f"square can", stacklevel=3)
