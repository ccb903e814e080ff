"""GAT (guided adversarial training): a classifier trained adversarially on its main task, with self-supervised
auxiliary heads on the shared encoder.

The main task is trained by any objective over the main tasks only (``madry_mix`` as the GAT code's "MADRY",
``madry``, ``trades``, or clean), so the adversarial examples come from the main tasks' loss alone. Each
auxiliary task (:mod:`mtrobust_fast.auxiliary`) makes its own inputs and labels from the batch and is trained
on those clean inputs. Which images each head sees is ``routing``:

- ``shared`` (the GAT code): the auxiliary transforms are applied in turn to the batch (rotation, then jigsaw,
  then the autoencoder and HOG, whose targets come from the transformed image), and that one transformed batch replaces the input
  of every head, the main one included (the auxiliary heads are scored on the main objective's clean forward
  pass when it has one: madry_mix, trades, clean);
- ``separate``: the main head (and its attack) sees the original images, each auxiliary head its own
  transformed copy of them (one more forward pass per auxiliary task).

The weighting strategy then combines the main and auxiliary losses (and the curvature term, if any).
"""
from mtrobust_fast.training.objectives import Objective, ObjectiveOutput, forward

ROUTINGS = ("shared", "separate")
_ORDER = ("rotation", "jigsaw", "autoencoder", "hog")  # reconstruction targets come from what the others made


class GAT(Objective):
    """``main``: the objective over the main tasks; ``aux``: auxiliary task records; ``routing``: see above."""

    name = "gat"

    def __init__(self, main, aux, routing="shared"):
        if routing not in ROUTINGS:
            raise ValueError(f"aux_routing must be one of {ROUTINGS}, got {routing!r}")
        if not aux:
            raise ValueError("GAT needs at least one auxiliary task")
        if type(main).updates is not Objective.updates:
            raise ValueError("GAT's main objective must make one update per batch (free replays batches)")
        self.main, self.routing = main, routing
        self.aux = sorted(aux, key=lambda task: _ORDER.index(task.kind))

    def start_epoch(self, epoch):
        self.main.start_epoch(epoch)

    def shared_batch(self, images):
        """The batch every head sees under ``shared`` routing, and the auxiliary labels."""
        labels = {}
        for task in self.aux:
            images, labels[task.name] = task.transform(images)
        return images, labels

    def updates(self, model, images, targets, masks):
        if self.routing == "shared":
            x, aux_targets = self.shared_batch(images)
            out = self.main(model, x, targets, masks)
            features = [] if out.features is not None else None
            outputs = out.clean_outputs  # every head's output on x, when the main objective had a clean pass
            if outputs is None:
                outputs = forward(model, x, features)
            aux_losses = {t.name: t.loss(outputs[t.name], aux_targets[t.name]).mean() for t in self.aux}
            batch = (x, {**targets, **aux_targets}, masks)
        else:
            out = self.main(model, images, targets, masks)
            features = [] if out.features is not None else None
            aux_losses = {}
            for task in self.aux:
                x, labels = task.transform(images)
                aux_losses[task.name] = task.loss(forward(model, x, features)[task.name], labels).mean()
            batch = None
        yield ObjectiveOutput({**out.task_losses, **aux_losses},
                              None if features is None else out.features + features, batch)

    def describe(self):
        return {**self.main.describe(), "gat": {"aux": [t.to_config() for t in self.aux], "routing": self.routing}}
