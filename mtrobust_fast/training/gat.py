"""GAT (guided adversarial training): a classifier trained adversarially on its main task, with self-supervised
auxiliary heads on the shared encoder.

The main task is trained by any objective over the main tasks only (``madry_mix`` as the GAT code's "MADRY",
``madry``, ``trades``, or clean), so the adversarial examples come from the main tasks' loss alone. Each
auxiliary task (:mod:`mtrobust_fast.tasks.auxiliary`) makes its own inputs and labels from the batch and is trained
on those clean inputs. Which images each head sees is ``routing``:

- ``shared`` (the GAT code): the auxiliary transforms are applied in turn to the batch (rotation, then jigsaw,
  then the autoencoder and HOG, whose targets come from the transformed image; the data's depth maps are
  turned and shuffled with the images), and that one transformed batch replaces the input
  of every head, the main one included (the auxiliary heads are scored on the main objective's clean forward
  pass when it has one: madry_mix, trades, clean);
- ``separate``: the main head (and its attack) sees the original images, each auxiliary head its own
  transformed copy of them (one more forward pass per auxiliary task).

The weighting strategy then combines the main and auxiliary losses (and the curvature term, if any).
"""
from mtrobust_fast.training.objectives import Objective, ObjectiveOutput, Wrapper, forward

ROUTINGS = ("shared", "separate")


class GAT(Wrapper):
    """``main``: the objective over the main tasks (held as ``inner``); ``aux``: auxiliary task records;
    ``routing``: see above."""

    name = "gat"

    def __init__(self, main, aux, routing="shared"):
        if routing not in ROUTINGS:
            raise ValueError(f"aux_routing must be one of {ROUTINGS}, got {routing!r}")
        if not aux:
            raise ValueError("GAT needs at least one auxiliary task")
        if type(main).updates is not Objective.updates:
            raise ValueError("GAT's main objective must make one update per batch (free replays batches)")
        self.inner, self.routing = main, routing
        self.aux = sorted(aux, key=lambda task: task.order)  # targets come from what the ones before made

    def shared_batch(self, images, targets, masks):
        """The batch every head sees under ``shared`` routing: images, targets with the auxiliary labels, masks.
        Labelled per-pixel targets of the data (depth) and their masks are warped along with the images."""
        targets, masks = dict(targets), dict(masks)
        for task in self.aux:
            if task.from_data:
                continue
            images, targets[task.name] = task.transform(images)
            if task.warp is not None:
                for data_task in (t for t in self.aux if t.from_data):
                    labels = targets[task.name]
                    targets[data_task.name] = task.warp(targets[data_task.name], labels)
                    if data_task.name in masks:
                        masks[data_task.name] = task.warp(masks[data_task.name], labels)
        return images, targets, masks

    def updates(self, model, images, targets, masks):
        if self.routing == "shared":
            x, all_targets, all_masks = self.shared_batch(images, targets, masks)
            out = self.inner(model, x, targets, masks)
            features = [] if out.features is not None else None
            outputs = out.clean_outputs  # every head's output on x, when the main objective had a clean pass
            if outputs is None:
                outputs = forward(model, x, features)
            aux_losses = {t.name: t.loss(outputs[t.name], all_targets[t.name], all_masks.get(t.name)).mean()
                          for t in self.aux}
            batch = (x, all_targets, all_masks)
        else:
            out = self.inner(model, images, targets, masks)
            features = [] if out.features is not None else None
            aux_losses = {}
            for task in self.aux:
                x, labels = (images, targets[task.name]) if task.from_data \
                    else task.transform(images)
                output = forward(model, x, features)[task.name]
                aux_losses[task.name] = task.loss(output, labels, masks.get(task.name)).mean()
            batch = None
        yield ObjectiveOutput({**out.task_losses, **aux_losses},
                              None if features is None else out.features + features, batch)

    def describe(self):
        return {**self.inner.describe(), "gat": {"aux": [t.to_config() for t in self.aux], "routing": self.routing}}
