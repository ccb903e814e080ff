"""Attacks on multi-task models, every update through the fused ``attack_step`` operator.

``ATTACKS`` names the attacks front-ends can build; :func:`build_attack` builds one from settings and refuses,
with the attack's own reason, a setting it does not take (each attack class declares its ``settings``).
"""
from mtrobust_fast.attacks.apgd import APGD, APGDT
from mtrobust_fast.attacks.autoattack import AutoAttack
from mtrobust_fast.attacks.ensemble import DenseEnsemble
from mtrobust_fast.attacks.base import MODEL_MODES, Attack, unwrap
from mtrobust_fast.attacks.cyclic import CyclicBatch, CyclicStep
from mtrobust_fast.attacks.fab import FAB
from mtrobust_fast.attacks.grid import GridPGD
from mtrobust_fast.attacks.pgd import FGSM, PGD, CosPGD, SegPGD
from mtrobust_fast.attacks.relative import RelativePGD
from mtrobust_fast.attacks.square import Square
from mtrobust_fast.attacks.specs import TaskSpec, classification, from_task
from mtrobust_fast.attacks.wgd import WGD

ATTACKS = {"pgd": PGD, "wgd": WGD, "apgd": APGD, "fgsm": FGSM, "apgdt": APGDT, "fab": FAB, "square": Square,
           "autoattack": AutoAttack, "ensemble": DenseEnsemble, "segpgd": SegPGD, "cospgd": CosPGD,
           "relative": RelativePGD, "cyclic_step": CyclicStep, "cyclic_batch": CyclicBatch, "grid": GridPGD}


class SettingRefused(ValueError):
    """An attack does not take a setting; ``setting`` names it, the message says why."""

    def __init__(self, setting, reason):
        super().__init__(f"{setting}: {reason}")
        self.setting, self.reason = setting, reason


def build_attack(name, model, tasks=None, **settings):
    """The attack ``name`` (a key of ``ATTACKS``) on ``model``. Settings that are None mean "the attack's own
    default" and are left out; a setting the attack does not take raises :class:`SettingRefused`."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    optional = {key for c in ATTACKS.values() for key in c.settings} | {key for c in ATTACKS.values() for key in c.refused}
    chosen = {}
    for key, value in settings.items():
        if value is None or (key in optional and value is False):
            continue
        if key in optional and key not in cls.settings:
            raise SettingRefused(key, cls.refused.get(key, f"{name} does not take it"))
        chosen[key] = value
    return cls(model, tasks, **chosen)


__all__ = ["ATTACKS", "MODEL_MODES", "Attack", "PGD", "FGSM", "WGD", "APGD", "APGDT", "FAB", "Square", "AutoAttack",
           "DenseEnsemble", "SegPGD", "CosPGD", "RelativePGD", "CyclicStep", "CyclicBatch", "GridPGD",
           "SettingRefused", "TaskSpec", "build_attack", "classification", "from_task", "unwrap"]
