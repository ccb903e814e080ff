"""A task's clean metrics accumulated over batches."""
from mtrobust_fast.tasks.taskonomy import get_task


class TaskMeter:
    """Accumulates a task's clean metrics over batches (pooled over all valid pixels, not a mean of batch
    means); statistics stay on the device until ``compute``."""

    def __init__(self, task):
        self.task = get_task(task)
        self.reset()

    def reset(self):
        self._stats = None

    def update(self, output, target, mask=None):
        stats = self.task.metric_stats(output.detach(), target, mask)
        self._stats = stats if self._stats is None else self._stats + stats

    def compute(self):
        """dict metric name -> float; directions are in ``task.higher_is_better``."""
        if self._stats is None:
            raise RuntimeError(f"TaskMeter({self.task.name!r}) has seen no batch")
        return self.task.metric_scores(self._stats.cpu())
