"""The open task protocol: a MultiTaskModel whose heads are not Taskonomy tasks, attacked and evaluated through
user TaskSpecs and task records, works like a plain module returning the same dict."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from mtrobust_fast import evaluation
from mtrobust_fast.tasks import classification
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.attacks import APGD, PGD, WGD, DenseEnsemble, TaskSpec
from mtrobust_fast.models.multitask import MultiTaskModel


class TinyEncoder(nn.Module):
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _model(records=None):
    torch.manual_seed(0)
    heads = {"seg": nn.Conv2d(8, 4, 1), "depth": nn.Conv2d(8, 1, 1)}
    return MultiTaskModel(TinyEncoder(), heads, config={"input_stride": 1}, records=records).eval()


def _seg_loss(output, target, mask=None):
    return nn.functional.cross_entropy(output, target, reduction="none").flatten(1).mean(1)


def _depth_loss(output, target, mask=None):
    return (output - target).abs().flatten(1).mean(1)


SPECS = [TaskSpec("seg", _seg_loss, key="seg"), TaskSpec("depth", _depth_loss, key="depth")]


def _batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=generator)
    return x, {"seg": torch.randint(0, 4, (2, 8, 8), generator=generator),
               "depth": torch.rand(2, 1, 8, 8, generator=generator)}


@pytest.mark.parametrize("attack", [PGD, WGD, APGD, DenseEnsemble])
def test_custom_heads_are_attacked_through_user_specs(attack):
    model = _model()
    x, targets = _batch()
    atk = attack(model, SPECS, eps=4 / 255, steps=3, target_tasks=["seg"])
    adv = atk(x, targets)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 4 / 255 + 1e-6
    before, after = (atk.losses(point, targets)["seg"].sum() for point in (x, adv))
    assert after > before
    both = attack(model, SPECS, eps=4 / 255, steps=2).run_subsets(x, targets, subsets=[["seg"], ["seg", "depth"]])
    assert both.shape == (2, *x.shape)


def test_a_head_without_a_record_is_named_when_no_specs_are_given():
    with pytest.raises(ValueError, match="seg"):
        PGD(_model(), eps=4 / 255, steps=1)


def test_custom_heads_with_records_are_attacked_and_evaluated():
    """Task records given to the model (here a classification-style record for a 4-class pixel head and the
    depth record of the registry under another name) make the model attackable with no specs, and evaluable."""
    depth = task_registry.get_task("d")
    records = {"seg": classification.ClassificationTask("seg", classes=4),
               "depth": dataclasses.replace(depth, name="depth")}
    model = _model(records)
    assert set(model.task_records) == {"seg", "depth"}
    x, targets = _batch()
    labels = {"seg": torch.randint(0, 4, (2,)), "depth": targets["depth"]}
    model.decoders["seg"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    atk = PGD(model, eps=4 / 255, steps=2, target_tasks=["seg"])
    loader = DataLoader(TensorDataset(x, labels["seg"], labels["depth"]), batch_size=2)
    batches = ((xb, {"seg": sb, "depth": db}, {}) for xb, sb, db in loader)
    summary = evaluation.evaluate(model, list(batches), atk, gradients=False)
    assert set(summary["clean"]) == {"seg", "depth"} and summary["samples"] == 2


def test_one_rule_turns_what_a_user_wrote_into_the_models_tasks():
    from mtrobust_fast.task_names import TaskNotInModel, model_tasks

    taskonomy = ["segment_semantic", "depth_zbuffer", "normal"]
    for spec in ("ds", "s,d", ["depth_zbuffer", "s"], [task_registry.get_task("d"), "s"], "sds"):
        assert model_tasks(spec, taskonomy) == ["segment_semantic", "depth_zbuffer"], spec
    heads = ["class", "rotation", "sd"]
    assert model_tasks("class,rotation", heads) == ["class", "rotation"]
    assert model_tasks("sd", heads) == ["sd"]  # a head name wins over letters
    with pytest.raises(TaskNotInModel, match="'E' is not one of the model's tasks"):
        model_tasks("sE", taskonomy, "sets")
    with pytest.raises(ValueError, match="^sets: unknown task letter 'x' in 'sx'"):
        model_tasks("sx", taskonomy, "sets")
