"""Datasets: Taskonomy (real or synthetic) for dense multi-task models, object classification (the synthetic
object set, CIFAR-10/100) for classifiers.

Every dataset yields ``(image, targets, masks)`` with images in [0, 1] and targets/masks as dicts keyed by task
name, so training, attacks and evaluation handle both kinds the same way.
"""


def open_dataset(root, model, split="val", size=None):
    """The dataset at ``root`` that fits ``model``: its tasks, and its input size unless ``size`` is given."""
    size = size or model.config.get("input_size")
    if model.config.get("kind") == "classifier":
        from mtrobust_fast.data.classification import open_classification

        heads = model.config["heads"]
        dataset = open_classification(root, split, size, domain="domain" in model.evaluated_task_names)
        for name, classes in (("class", dataset.classes), ("domain", dataset.domain_classes)):
            if name in heads and name in model.evaluated_task_names and classes != heads[name]["classes"]:
                raise ValueError(f"{root} has {classes} {name} labels but the model's {name!r} head has "
                                 f"{heads[name]['classes']}")
        return dataset
    from mtrobust_fast.data.taskonomy import TaskonomyDataset

    return TaskonomyDataset(root, model.config["tasks"], split=split, size=size)
