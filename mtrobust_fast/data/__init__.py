"""Datasets: Taskonomy (real or synthetic) for dense multi-task models, object classification for classifiers.

Every dataset yields ``(image, targets, masks)`` with images in [0, 1] and targets/masks as dicts keyed by task
name, so training, attacks and evaluation handle both kinds the same way.
"""


def open_dataset(root, model, split="val", size=None):
    """The dataset at ``root`` that fits ``model``: its tasks, and its input size unless ``size`` is given."""
    from mtrobust_fast.data.taskonomy import TaskonomyDataset

    return TaskonomyDataset(root, model.config["tasks"], split=split, size=size or model.config.get("input_size"))
