"""The open task protocol: what attacks, metrics, evaluation and training need to know about one task.

A task record has a ``name``; per-sample ``loss(output, target, mask) -> [B]`` and ``error(output, target, mask)
-> [B]`` (lower is better); ``divergence(output, reference, mask) -> [B]`` (how far an output moved from a
reference output; TRADES penalises it); summable ``metric_stats(output, target, mask)`` and ``metric_scores(stats)
-> {metric: float}`` with ``higher_is_better`` (metric -> direction). The Taskonomy tasks, classification,
multi-label and regression heads, GAT's auxiliary tasks and any user class with these members are records.
"""
from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class TaskRecord(Protocol):
    name: str
    higher_is_better: Mapping[str, bool]

    def loss(self, output, target, mask=None): ...

    def error(self, output, target, mask=None): ...

    def divergence(self, output, reference, mask=None): ...

    def metric_stats(self, output, target, mask=None): ...

    def metric_scores(self, stats): ...
