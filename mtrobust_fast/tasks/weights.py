"""Task loss weights: uniform, or the AAAI'22 paper's main/auxiliary ("Zamir") table."""
from mtrobust_fast.tasks.taskonomy import get_task, resolve


# AAAI'22 supplement App. B, "optimal Zamir weights": main task weight 1; auxiliary weight by main task,
# with one exception per main: main letter -> (usual auxiliary weight, {auxiliary letter: weight}).
ZAMIR_AUXILIARY_WEIGHTS = {
    "s": (0.1, {"d": 0.01}),
    "d": (0.1, {"n": 0.01}),
    "n": (0.1, {"d": 0.01}),
    "D": (0.01, {"s": 0.1}),
    "E": (0.1, {}),
}


def task_weights(tasks, main=None, mode="uniform"):
    """Loss weights keyed by task name.

    uniform: every task 1/N (``main`` is only checked to be one of the tasks).
    zamir: main task 1, each auxiliary from the paper's table; only mains s, d, D, n, E have a table row.
    """
    chosen = resolve(tasks)
    main_task = None if main is None else get_task(main)
    if main_task is not None and main_task not in chosen:
        raise ValueError(f"main task {main_task.name!r} is not one of {[t.name for t in chosen]}")
    if mode == "uniform":
        return {task.name: 1.0 / len(chosen) for task in chosen}
    if mode != "zamir":
        raise ValueError(f"mode must be 'uniform' or 'zamir', got {mode!r}")
    if main_task is None:
        if len(chosen) > 1:
            raise ValueError("mode='zamir' needs main= (the main task) when there are several tasks")
        main_task = chosen[0]
    if len(chosen) > 1 and main_task.letter not in ZAMIR_AUXILIARY_WEIGHTS:
        raise ValueError(f"the Zamir weight table has no row for main task {main_task.name!r}; "
                         f"mains with a row: {' '.join(ZAMIR_AUXILIARY_WEIGHTS)}")
    usual, exceptions = ZAMIR_AUXILIARY_WEIGHTS.get(main_task.letter, (None, {}))
    return {task.name: 1.0 if task is main_task else exceptions.get(task.letter, usual) for task in chosen}
