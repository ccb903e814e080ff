"""The relative-loss-change attack for multi-task sets (the first-order rule of DGBA, Zhang et al. 2023,
arXiv 2305.12066): raise every attacked task's loss by the same *factor* rather than the same amount."""

from mtrobust_fast.attacks.base import ATTACKS
from mtrobust_fast.attacks.pgd import PGD

FLOOR = 1e-12  # losses are floored here before the logarithm (a task already at zero loss)


@ATTACKS.register("relative")
class RelativePGD(PGD):
    """PGD whose per-sample direction is Σ_t w_t ∇L_t / L_t, the gradient of Σ_t w_t log L_t: each attacked
    task's loss counts relative to its current value, so a task with a large loss cannot drown out the
    others (plain PGD ascends Σ_t w_t L_t). For one attacked task the sign step is the same as PGD's.
    Arguments are PGD's; the worst case over restarts is the one with the highest Σ_t w_t log L_t."""

    def _row_losses(self, x, rows):
        return super()._row_losses(x, rows).clamp_min(FLOOR).log()
