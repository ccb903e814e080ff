"""Collapsed models: heads whose clean outputs do not depend on the input.

A head that outputs the same tensor for every image, or predicts one class for every image (and pixel), gives an
adversarial error equal to its clean error: nothing the attack does changes its answer, so it looks perfectly
robust. Evaluations flag such heads so a table never presents that as robustness.
"""
import torch

from mtrobust_fast.tasks.classification import ClassificationTask

RELATIVE_TOLERANCE = 1e-4  # outputs within this fraction of their magnitude count as the same


class CollapseDetector:
    """Accumulates, over every evaluated batch, how far each head's output moves from the first image's output
    and which classes a categorical head predicts (and which the labels hold)."""

    def __init__(self, records):
        self.records = list(records)
        self.first, self.deviation, self.scale = {}, {}, {}
        self.predicted, self.labelled, self.images = {}, {}, 0

    @staticmethod
    def _categorical(record):
        return isinstance(record, ClassificationTask) or getattr(record, "is_segmentation", False)

    @torch.no_grad()
    def add(self, outputs, targets, masks):
        self.images += next(iter(outputs.values())).shape[0] if isinstance(outputs, dict) and outputs else 0
        for record in self.records:
            out = outputs.get(record.name) if isinstance(outputs, dict) else None
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                continue
            out = out.detach().float()
            reference = self.first.setdefault(record.name, out[0].clone())
            self.deviation[record.name] = max(self.deviation.get(record.name, 0.0),
                                              float((out - reference).abs().max()))
            self.scale[record.name] = max(self.scale.get(record.name, 0.0), float(reference.abs().max()))
            if self._categorical(record) and out.dim() >= 2:
                predicted = out.argmax(1)
                labels = targets.get(record.name)
                mask = masks.get(record.name)
                if mask is not None and mask.shape == predicted.shape:
                    predicted = predicted[mask.bool()]
                self.predicted.setdefault(record.name, set()).update(predicted.unique().tolist())
                if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
                    valid = labels if mask is None or mask.shape != labels.shape else labels[mask.bool()]
                    self.labelled.setdefault(record.name, set()).update(valid.unique().tolist())

    def result(self):
        """{task name: why it looks collapsed} for the heads that do."""
        if self.images < 2:
            return {}
        found = {}
        for name, deviation in self.deviation.items():
            if deviation <= RELATIVE_TOLERANCE * max(self.scale[name], 1e-12):
                found[name] = "the same output for every image"
            elif len(self.predicted.get(name, ())) == 1 and len(self.labelled.get(name, ())) > 1:
                (only,) = self.predicted[name]
                found[name] = f"predicts class {only} everywhere while the labels hold {len(self.labelled[name])}"
        return found
