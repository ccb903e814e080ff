"""Attacks on multi-task models, every update through the fused ``attack_step`` operator (SPEC §6)."""
from mtrobust_fast.attacks.apgd import APGD
from mtrobust_fast.attacks.base import Attack
from mtrobust_fast.attacks.pgd import FGSM, PGD
from mtrobust_fast.attacks.specs import TaskSpec, classification, cross_entropy, dlr, from_task
from mtrobust_fast.attacks.wgd import WGD

__all__ = ["Attack", "PGD", "FGSM", "WGD", "APGD", "TaskSpec", "classification", "cross_entropy", "dlr", "from_task"]
