"""Stand-ins for `headsteer.bench.kernels.warm_up_task` that the warm-up's spawned workers can
import cheaply (no torch, no kernels): they sleep, or report an error, as told."""
import time


def sleep_task(task):
    """task = (name, seconds): sleep that long; a name "fail" reports an error instead."""
    name, seconds = task
    if name == "fail":
        return task, 0.0, "RuntimeError: planned failure"
    time.sleep(seconds)
    return task, float(seconds), ""
