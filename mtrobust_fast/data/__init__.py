"""Datasets: Taskonomy (real or synthetic) and NYUv2 / Cityscapes (:mod:`~mtrobust_fast.data.benchmarks`) for dense
multi-task models; classification (the synthetic object set, CIFAR-10/100, STL-10, image folders, chest X-rays)
for classifiers.

Every dataset yields ``(image, targets, masks)`` with images in [0, 1] and targets/masks as dicts keyed by task
name, so training, attacks and evaluation handle both kinds the same way.
"""

from pathlib import Path

UNFINISHED = ".synth-unfinished"  # in a folder a data generator is writing (or was killed while writing)


def refuse_unfinished(root):
    """A ValueError when ``root`` holds a generated dataset whose writing has not finished: a generator killed
    mid-way leaves some images and no complete index, which a reader could otherwise take for a small dataset."""
    if (Path(root) / UNFINISHED).exists():
        raise ValueError(f"{root}: its data generator did not finish (it was interrupted, or is still writing); "
                         f"run the same `data synth` command again, which replaces the partial files")


def open_dataset(root, model, split="val", size=None):
    """The dataset at ``root`` that fits ``model``: its tasks, and its input size unless ``size`` is given."""
    size = size or model.config.get("input_size")
    if model.config.get("kind") == "classifier":
        from mtrobust_fast.data.classification import open_classification

        heads = model.config["heads"]
        domain = model.config.get("domain", ["domain"] if "domain" in heads else [])
        findings = getattr(model.task_records.get("class"), "label_names", None)
        dataset = open_classification(root, split, size, domain=bool(domain),
                                      findings=findings if heads.get("class", {}).get("kind") == "multilabel" else None)
        records = model.task_records
        found = {"class": getattr(dataset, "main_task", None), "domain": None,
                 **{t.name: t for t in getattr(dataset, "domain_tasks", ())}}
        classes = {"class": dataset.classes, "domain": dataset.domain_classes}
        for name in model.evaluated_task_names:
            record, data_record = records[name], found.get(name)
            if data_record is not None and data_record != record:
                raise ValueError(f"{root}: its {name!r} labels ({data_record.to_config()}) do not match the "
                                 f"model's {name!r} head ({record.to_config()})")
            if data_record is None and name in classes and classes[name] != record.classes:
                raise ValueError(f"{root} has {classes[name]} {name} labels but the model's {name!r} head has "
                                 f"{record.classes}")
        return dataset
    if model.config.get("kind") == "dense":
        from mtrobust_fast.data.benchmarks import open_benchmark

        dataset = open_benchmark(root, model.evaluated_task_names, split=split, size=size)
        for record in dataset.records:
            if record.to_config() != model.task_records[record.name].to_config():
                raise ValueError(f"{root}: its {record.name!r} labels ({record.to_config()}) do not match the "
                                 f"model's head ({model.task_records[record.name].to_config()})")
        return dataset
    from mtrobust_fast.data.taskonomy import TaskonomyDataset

    return TaskonomyDataset(root, model.config["tasks"], split=split, size=size)
