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


def barrier_task(task):
    """task = (folder, n): leave a file in the folder, then wait (up to a minute) until n tasks
    have: n tasks finish together only when they run in n processes at once."""
    import os
    from pathlib import Path

    folder, n = task
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return task, 0.0, "" if len(os.listdir(folder)) >= n else "RuntimeError: alone"
