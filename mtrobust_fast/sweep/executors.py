"""Where cells run: in this process, one after another (the default), or as Ray tasks over every GPU of a node or
cluster. Either way ``on_done(cell, result)`` runs in this (the driver) process as each cell finishes, so parts are
written by one process through the same atomic store and the table does not depend on the executor. A cell runs
only if ``claim(cell)`` says so (another sweep on the same folder may hold it); both return the cells they ran."""
from tqdm import tqdm

from mtrobust_fast.sweep.cell import run_cell


def run_local(cells, on_done, claim, device="auto", record_steps=False, progress=True):
    ran = []
    for cell in tqdm(cells, desc="sweep", unit="cell", disable=not progress):
        if claim(cell):  # claimed just before it runs, so concurrent sweeps interleave
            on_done(cell, run_cell(cell.settings(), device, record_steps))
            ran.append(cell)
    return ran


def run_ray(cells, on_done, claim, device="auto", record_steps=False, progress=True, address=None, num_cpus=None):
    """One Ray task per cell: one GPU each when the cluster has GPUs, else one CPU each. ``address``: a running
    cluster ("auto" or host:port); None starts a local one with ``num_cpus`` CPUs (default: all)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(run_cell).options(num_gpus=1, num_cpus=0) if gpus else \
            ray.remote(run_cell).options(num_cpus=1)
        pending = {task.remote(cell.settings(), device, record_steps): cell for cell in cells if claim(cell)}
        ran = list(pending.values())
        with tqdm(total=len(pending), desc="sweep (ray)", unit="cell", disable=not progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as error:  # the task's own exception, not Ray's wrapper
                        raise error.cause from None
                    on_done(pending.pop(ref), result)
                    bar.update()
    finally:
        if started:
            ray.shutdown()
    return ran


EXECUTORS = {"local": run_local, "ray": run_ray}
