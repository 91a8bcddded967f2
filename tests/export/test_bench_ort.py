"""`python -m headsteer.export.bench_ort`: arguments refused up front, the same work on every
side (steering vectors included), cells timed round-robin, and one small run end to end. No
timing assertions."""
from __future__ import annotations

import pytest
import torch

from headsteer.export import bench_ort


@pytest.mark.parametrize("args", [["--bundle", "b", "--model", "m"], ["--iters", "0"], ["--threads", "0"],
                                  ["--batches", "0"], ["--warmup", "-1"]])
def test_bad_arguments_are_refused(args):
    with pytest.raises(SystemExit):
        bench_ort.parse_args(args)


def test_default_model_only_without_a_bundle():
    assert bench_ort.parse_args([]).model == bench_ort.DEFAULT_MODEL
    args = bench_ort.parse_args(["--bundle", "b"])
    assert args.bundle == "b" and args.model is None


def test_cells_are_timed_round_robin():
    calls = []
    cells = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = bench_ort.time_round_robin(cells, warmup=1, iters=4, seed=0)
    assert set(medians) == set("abc")
    timed = calls[3:]  # after one warm-up call each
    assert len(timed) == 12 and all(sorted(timed[i:i + 3]) == list("abc") for i in range(0, 12, 3))
    assert len({tuple(timed[i:i + 3]) for i in range(0, 12, 3)}) > 1  # the order is shuffled


def test_every_side_gets_the_same_steering(exported):
    from headsteer.bench.harness import steering_vectors

    seen = []

    class Spy:
        def __call__(self, pixels, scale, shift, backend=None):
            seen.append((backend, scale, shift))

    steer = steering_vectors(exported.model, 2, "cpu")
    assert steer[0] is not None and not torch.all(steer[0] == 1)  # not the identity: every SAE computed
    pixels = torch.zeros(2, 3, *exported.model.image_size)
    sessions = {"masked": lambda p, scale, shift: seen.append(("masked", scale, shift))}
    for fn in bench_ort._batch_cells(Spy(), sessions, pixels, steer).values():
        fn()
    assert [name for name, _, _ in seen] == ["compact", "reference", "masked"]
    assert all(scale is steer[0] and shift is steer[1] for _, scale, shift in seen)


def test_small_run_end_to_end(exported, capsys):
    threads = torch.get_num_threads()
    assert bench_ort.main(["--bundle", str(exported.bundle), "--batches", "2", "--iters", "2", "--warmup", "0",
                           "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| masked | 2 |" in out and "| sparse | 2 |" in out and "spinning off" in out
    assert torch.get_num_threads() == threads  # restored after --threads 1
