"""Attacks on multi-task models, every update through the fused ``attack_step`` operator.

Every attack registers itself in ``ATTACKS`` where it is defined and declares its optional settings there;
:func:`build_attack` builds one from settings and refuses, with the attack's own reason, a setting it does not
take.
"""
from mtrobust_fast.attacks.apgd import APGD, APGDT
from mtrobust_fast.attacks.autoattack import AutoAttack
from mtrobust_fast.attacks.ensemble import DenseEnsemble
from mtrobust_fast.attacks.base import ATTACKS, MODEL_MODES, Attack, unwrap
from mtrobust_fast.attacks.cyclic import CyclicBatch, CyclicStep
from mtrobust_fast.attacks.fab import FAB
from mtrobust_fast.attacks.grid import GridPGD
from mtrobust_fast.attacks.pgd import FGSM, NFGSM, PGD, CosPGD, SegPGD
from mtrobust_fast.attacks.relative import RelativePGD
from mtrobust_fast.attacks.square import Square
from mtrobust_fast.attacks.specs import TaskSpec, classification, from_task
from mtrobust_fast.attacks.wgd import WGD
from mtrobust_fast.registry import SettingValueError


class SettingRefused(SettingValueError):
    """An attack does not take a setting; ``setting`` names it, ``reason`` says why."""


def build_attack(name, model, tasks=None, **settings):
    """The attack ``name`` (registered in ``ATTACKS``) on ``model``. Settings that are None mean "the attack's own
    default" and are left out, as is False for an optional setting that is off by default (a switch not
    turned on); an optional setting (one some registered attack declares) that this attack does not declare raises
    :class:`SettingRefused`."""
    cls = ATTACKS.get(name)
    declared = ATTACKS.settings()
    optional = set(declared) | {key for c in ATTACKS.values() for key in c.refused}
    chosen = {}
    for key, value in settings.items():
        switch_off = value is False and key in optional and (key not in declared or declared[key].default is not True)
        if value is None or switch_off:
            continue
        if key in optional and not cls.takes(key):
            raise SettingRefused(key, cls.refused.get(key, f"{name} does not take it"))
        chosen[key] = value
    return cls(model, tasks, **chosen)


__all__ = ["ATTACKS", "MODEL_MODES", "Attack", "PGD", "FGSM", "NFGSM", "WGD", "APGD", "APGDT", "FAB", "Square", "AutoAttack",
           "DenseEnsemble", "SegPGD", "CosPGD", "RelativePGD", "CyclicStep", "CyclicBatch", "GridPGD",
           "SettingRefused", "TaskSpec", "build_attack", "classification", "from_task", "unwrap"]
