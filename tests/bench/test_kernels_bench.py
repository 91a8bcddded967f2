"""`headsteer.bench.kernels` end to end with tiny shapes and a fake timer, so every code path of
the GPU benchmark runs on any machine (on the CPU in fp16 under TRITON_INTERPRET); the timings
themselves are GPU-only."""
import pytest
import torch

from headsteer.bench import kernels as bench
from tests.conftest import DEVICE

pytest.importorskip("triton")


@pytest.fixture
def tiny(monkeypatch):
    calls = []

    def fake_timed(fn):
        fn()  # the benchmarked call must run without error
        calls.append(fn)
        return float(len(calls)), float(len(calls)) / 2

    def fake_graph_timed(fn, rep_ms=bench.GRAPH_REP_MS):
        fn()
        calls.append(fn)
        return float(len(calls)) / 2

    # On a CUDA machine the kernels are compiled (no interpreter) and FlashAttention needs 16 bits.
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    # (fp16 on the CPU: the interpreter miscomputes bf16 dots; 16 bits take the tuned 16-bit tiles)
    monkeypatch.setattr(bench, "DTYPE", torch.bfloat16 if DEVICE == "cuda" else torch.float16)
    monkeypatch.setattr(bench, "BATCH", 3)
    monkeypatch.setattr(bench, "TOKENS", 9)
    monkeypatch.setattr(bench, "MODELS", {"tiny": (2, 32)})
    monkeypatch.setattr(bench, "timed", fake_timed)
    monkeypatch.setattr(bench, "graph_timed", fake_graph_timed)
    monkeypatch.setattr(bench, "L2_FLUSH_BYTES", 1024)
    return calls


def test_benchmark_tables(tiny):
    results = bench.run_benchmark()
    assert [r["usage"] for r in results["attention"]] == list(bench.USAGES)
    assert [r["heads_kept"] for r in results["attention"]] == [2, 1, 1, 1, 0]  # round(u * 2), halves up
    assert [r["sae"] for r in results["gate"]] == ["none", "S=4D topk k=16, scale", "S=4D topk k=16, scale + shift"]
    text = bench.markdown(results, "a CPU", "today", "python -m headsteer.bench.kernels")
    assert text.count("| tiny |") == len(bench.USAGES) + 3
    assert "| gate cold graph us | block cold graph us | share cold graph |" in text
    for row in results["gate"]:  # (the fake timer's cold differences are not times: only the keys)
        assert {"gate_cold_graph_us", "block_cold_graph_us", "share_cold_graph"} <= set(row)


def test_cold_graph_timing_flushes_l2_before_each_call_and_subtracts_the_flush(monkeypatch):
    """graph_timed_cold replays (flush, call) and takes off the flush replayed alone."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "L2_FLUSH_BYTES", 4096)
    replays = []

    def fake_graph_timed(fn, rep_ms=bench.GRAPH_REP_MS):
        replays.append([])
        fn()
        return 25.0 if "call" in replays[-1] else 10.0

    monkeypatch.setattr(bench, "graph_timed", fake_graph_timed)
    real_zero = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda self: replays[-1].append(f"flush {self.numel() * 4}") or
                        real_zero(self))
    assert bench.graph_timed_cold(lambda: replays[-1].append("call")) == 15.0
    assert replays == [["flush 4096", "call"], ["flush 4096"]]


def test_breakdown_times_each_kernel(tiny, capsys, monkeypatch):
    from headsteer.kernels import triton_head_attention as attention

    kept, real = [], attention.head_attention_launches
    monkeypatch.setattr(attention, "head_attention_launches", lambda x, keep, *a: kept.append(keep.sum(1).tolist()) or
                        real(x, keep, *a))
    results = bench.breakdown()
    rows = results["breakdown"]
    assert [(r["branch"], r["usage"]) for r in rows] == [("dense", None)] + [("sparse", u) for u in bench.USAGES + (0.0,)]
    assert kept == [[k] * bench.BATCH for k in (2, 1, 1, 1, 0, 0)]  # each usage's round(u * 2) heads
    for row in rows:
        assert set(row) - {"model", "usage", "branch", "total"} == set(bench.BREAKDOWN_STAGES)
        assert row["total"] == pytest.approx(sum(row[stage] for stage in bench.BREAKDOWN_STAGES))
    printed = capsys.readouterr().out.splitlines()  # the table, row by row as measured
    assert printed == bench.BREAKDOWN_HEADER.splitlines() + [bench.breakdown_row(row) for row in rows]


def test_breakdown_row_formats_the_times():
    row = dict(model="ViT-S", usage=None, branch="dense", qkv=10.04, attention=20.06, proj=3.0, total=33.1)
    assert bench.breakdown_row(row) == "| ViT-S | dense |  | 10.0 | 20.1 | 3.0 | 33.1 |"
    row.update(usage=0.33, branch="sparse", qkv=1.0, total=24.06)
    assert bench.breakdown_row(row) == "| ViT-S | sparse | 0.33 | 1.0 | 20.1 | 3.0 | 24.1 |"
    assert len(bench.breakdown_row(row).split("|")) == len(bench.BREAKDOWN_HEADER.splitlines()[0].split("|"))


def test_failure_is_the_first_line_of_the_message():
    assert bench.failure(ValueError("\n  out of resources\nsecond line")) == "ValueError: out of resources"
    assert bench.failure(RuntimeError()) == "RuntimeError: "


def test_dense_stages_compute_the_dense_branch(tiny):
    generator = torch.Generator().manual_seed(3)
    w = bench.make_block(2, 32, generator)
    x = torch.randn(3, 9, 32, generator=generator).to(bench.DEVICE, bench.DTYPE)
    (_, qkv), (_, attention), (_, proj) = bench.dense_stages(x, w, 2)
    torch.testing.assert_close(qkv(), torch.nn.functional.linear(x, w["qkv_w"], w["qkv_b"]))
    torch.testing.assert_close(proj(), bench.dense_attention(x, w, 2))  # (on the attention's output)
    attention()


def test_without_cuda_nothing_is_measured(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    assert bench.main(["--json", str(tmp_path / "k.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "k.json").exists()


def test_sweep_runs_every_tile_variant_and_restores_the_default(tiny, capsys):
    from headsteer.kernels import triton_head_attention as attention

    default = attention.TILES
    bench.sweep()
    dense, *lines = capsys.readouterr().out.splitlines()
    assert dense.startswith("tiny dense graph ")  # the baseline, timed first
    assert len(lines) == (len(tiny) - 1) // 2 >= 12  # one line per distinct fitted variant, two usages each
    assert len({line.split("TileConfig", 1)[1] for line in lines}) == len(lines)  # no tiling timed twice
    assert any("proj_kept_list_max_heads=0" in line for line in lines)  # a non-default variant ran
    # speedup = dense time / variant time (the fake timer counts calls: dense 0.5 us, then 1, 1.5, ...)
    first = lines[0].split()
    assert first[2:8] == ["u=1.0", "1.0us", "0.50x", "u=0.33", "1.5us", "0.33x"]
    assert attention.TILES is default


def test_gate_sweep_runs_every_variant_and_restores_the_defaults(tiny, capsys):
    from headsteer.kernels import triton_sae_gate as gate

    names = ("BLOCK_S", "GATE_WARPS", "GATE_STAGES", "_GATE_TILE_ELEMENTS", "ENCODER_BLOCK_K", "_LATENT_TILES_ONLY",
             "TOPK_DIGIT_BITS", "SAE_16BIT_MMA", "SHIFT_DECODE_CHAINS")
    defaults = [getattr(gate, name) for name in names]
    bench.gate_sweep()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 16 and len(tiny) == 48  # each variant timed with an SAE (scale; + shift) and without
    assert "defaults" in lines[0] and "_LATENT_TILES_ONLY" in lines[1] and "'ENCODER_BLOCK_K': 32" in lines[2]
    # (the alternatives already timed come last)
    assert "'TOPK_DIGIT_BITS': 1" in lines[10] and "'GATE_STAGES': 3" in lines[-1]
    assert [getattr(gate, name) for name in names] == defaults


def test_profile_launches_each_kernel_once_in_order(tiny, capsys, monkeypatch):
    """`--profile` runs every case twice (compile, then the profiled launch), prints each label
    just before its profiled launch, and times nothing."""
    from headsteer.kernels import triton_head_attention as attention

    launches = []
    real = attention.head_attention_launches
    monkeypatch.setattr(attention, "head_attention_launches", lambda *a, **k: launches.append(a[0].shape) or real(*a, **k))
    labels = bench.profile_launches()
    assert labels == ["tiny gate, SAE topk k=16, scale", "tiny gate, no SAE", "tiny sparse branch, usage 1.00",
                      "tiny sparse branch, usage 0.33", "tiny dense branch"]
    assert capsys.readouterr().out.splitlines() == [f"profiled launch: {label}" for label in labels]
    assert len(launches) == 4 and tiny == []  # the two sparse cases, twice each; no timer called


def test_profile_prints_each_label_just_before_its_launch(monkeypatch, capsys):
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(bench, "launch_cases", lambda: [(label, lambda label=label: print("ran", label)) for label in "ab"])
    assert bench.profile_launches() == ["a", "b"]
    assert capsys.readouterr().out.splitlines() == ["ran a", "ran b", "profiled launch: a", "ran a", "profiled launch: b",
                                                    "ran b"]


def test_sweeps_and_breakdown_take_short_graph_timings(tiny, monkeypatch):
    """Hundreds of timings in a lease's minutes: each captures SWEEP_REP_MS of calls, not the
    table's GRAPH_REP_MS."""
    reps, graph_timed = [], bench.graph_timed
    monkeypatch.setattr(bench, "graph_timed", lambda fn, rep_ms=bench.GRAPH_REP_MS: reps.append(rep_ms) or graph_timed(fn))
    bench.sweep(bench.sweep_variants()[:1])
    bench.gate_sweep(bench.gate_sweep_variants()[:1])
    bench.breakdown()
    assert len(reps) > 10 and set(reps) == {bench.SWEEP_REP_MS} and bench.SWEEP_REP_MS < bench.GRAPH_REP_MS


def test_sweeps_report_a_failing_variant_and_time_the_rest(tiny, capsys, monkeypatch):
    """A variant that cannot run on the GPU at hand (e.g. out of shared memory) prints why and
    the sweep goes on: a lease's few minutes must not end with the rest of the sweep untimed."""
    from headsteer.kernels import triton_head_attention as attention
    from headsteer.kernels import triton_sae_gate as gate

    def run_or_fail(fn, make_fail):
        if make_fail():
            raise RuntimeError("out of resources: shared memory\nsecond line")
        return fn()

    graph_timed = bench.graph_timed
    # the attention sweep's q|k-as-one-MMA variants (in its middle) fail
    monkeypatch.setattr(bench, "graph_timed", lambda fn, rep_ms: run_or_fail(lambda: graph_timed(fn, rep_ms),
                                                                             lambda: attention.TILES.qkv_fuse_qk))
    bench.sweep()
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if "FAILED" in line]
    assert failed == [line for line in lines if "qkv_fuse_qk=True" in line] and len(failed) >= 1
    assert "RuntimeError: out of resources: shared memory" in failed[0] and "second line" not in failed[0]
    # the variants after them were timed, to the last one
    last_failure = max(index for index, line in enumerate(lines) if "FAILED" in line)
    assert last_failure < len(lines) - 1 and "FAILED" not in lines[-1]
    assert "qkv_block_k=128" in lines[-1] and "qkv_stages=2" in lines[-1]

    # the gate sweep's 256-latent-tile variant fails
    monkeypatch.setattr(bench, "graph_timed", lambda fn, rep_ms: run_or_fail(lambda: graph_timed(fn, rep_ms),
                                                                             lambda: gate.BLOCK_S == 256))
    bench.gate_sweep()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(bench.gate_sweep_variants())
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "'BLOCK_S': 256" in failed[0]
    assert "SAE topk, scale FAILED RuntimeError" in failed[0]
    assert "us" in lines[-1] and "FAILED" not in lines[-1]


@pytest.mark.parametrize("mode", ["table", "breakdown", "gate-sweep", "sweep"])
def test_warm_up_task_launches_what_the_timed_mode_times(tiny, monkeypatch, capsys, mode):
    """A warm-up task makes exactly the calls its timing mode times, each launched once, for one
    model and one variant, prints nothing, and leaves the module as it found it."""
    launched = []

    def launch_once(fn, rep_ms=bench.GRAPH_REP_MS):
        fn()
        launched.append(fn)
        return 1.0

    monkeypatch.setattr(bench, "_launch_once", launch_once)
    monkeypatch.setattr(bench, "MODELS", {"tiny": (2, 32), "other": (2, 32)})
    saved = bench.MODELS, bench.timed, bench.graph_timed
    task, seconds, error = bench.warm_up_task((mode, "tiny", 0))
    assert (task, error) == ((mode, "tiny", 0), "") and seconds > 0
    assert capsys.readouterr().out == ""
    assert (bench.MODELS, bench.timed, bench.graph_timed) == saved

    monkeypatch.setattr(bench, "MODELS", {"tiny": (2, 32)})  # the same mode, timed with the fake timer
    {"table": bench.run_benchmark, "breakdown": bench.breakdown,
     "gate-sweep": lambda: bench.gate_sweep(bench.gate_sweep_variants()[:1]),
     "sweep": lambda: bench.sweep(bench.sweep_variants()[:1])}[mode]()
    assert len(launched) == len(tiny) >= 2


def test_warm_up_task_reports_a_bad_task_as_an_error(tiny):
    assert bench.warm_up_task(("sweep", "tiny", 10**6))[2].startswith("IndexError")
    assert bench.warm_up_task(("timings", "tiny", 0))[2] == "ValueError: unknown warm-up mode 'timings'"
    assert bench.timed is not bench._launch_once_eager_and_graph


def test_warm_up_covers_every_mode_and_variant():
    tasks = bench.warm_up_tasks()
    per_mode = {mode: [t for t in tasks if t[0] == mode] for mode in ("table", "breakdown", "gate-sweep", "sweep")}
    assert len(tasks) == sum(map(len, per_mode.values())) == len(set(tasks))
    assert len(per_mode["sweep"]) == len(bench.sweep_variants()) * len(bench.MODELS)
    assert len(per_mode["gate-sweep"]) == len(bench.gate_sweep_variants()) * len(bench.MODELS)
    assert tasks.index(per_mode["gate-sweep"][0]) < tasks.index(per_mode["sweep"][0])  # slow compiles first
    models = [(model, 0) for model in bench.MODELS]  # the table and the breakdown first, each model once
    assert tasks[:2 * len(models)] == [("table", *m) for m in models] + [("breakdown", *m) for m in models]


def test_warm_up_runs_tasks_in_parallel_processes_and_reports_each(capsys):
    from tests.bench.warm_up_tasks import sleep_task

    assert bench.warm_up(2, 300, task_function=sleep_task, tasks=[("short", 0), ("fail", 0), ("short", 0.5)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and sum("RuntimeError: planned failure" in line for line in lines) == 1
    assert sum(line.endswith("short 0.5") for line in lines) == 1


def test_warm_up_runs_jobs_processes_at_once(tmp_path, capsys):
    """Two tasks that each wait for the other finish only in two processes at once."""
    from tests.bench.warm_up_tasks import barrier_task

    assert bench.warm_up(2, 50, task_function=barrier_task, tasks=[(str(tmp_path), 2)] * 2) == 2
    assert "alone" not in capsys.readouterr().out


def test_warm_up_stops_at_its_limit_and_ends_its_workers(capsys):
    import time

    from tests.bench.warm_up_tasks import sleep_task

    start = time.monotonic()
    assert bench.warm_up(1, 2, task_function=sleep_task, tasks=[("long", 600), ("long", 600)]) == 0
    assert time.monotonic() - start < 20  # the sleeping worker was terminated, not waited for, right at the limit
    assert "stopped at its 2 s limit with 2 of 2 tasks unfinished" in capsys.readouterr().out


def test_host_costs_time_each_launch_case(tiny, capsys, monkeypatch):
    """`--host` times `launch_cases()` in order, each call on its own, and prints each row as it
    is measured; without CUDA the dense branch (plain torch, which would compute here) is left out."""
    from headsteer.kernels import triton_head_attention as attention

    branch_calls = []
    real = attention.head_attention_launches
    monkeypatch.setattr(attention, "head_attention_launches", lambda *a, **k: branch_calls.append(1) or real(*a, **k))
    rows = bench.host_costs(repeats=3)
    labels = ["tiny gate, SAE topk k=16, scale", "tiny gate, no SAE", "tiny sparse branch, usage 1.00",
              "tiny sparse branch, usage 0.33"] + (["tiny dense branch"] if DEVICE == "cuda" else [])
    assert [row["launch"] for row in rows] == labels
    assert all(row["host_us"] > 0 for row in rows)
    assert len(branch_calls) == 2 * (1 + 3)  # a first call (compiling), then the timed ones
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [f"| {row['launch']} | {row['host_us']:.1f} |" for row in rows]
    assert tiny == []  # no GPU timer


def test_host_us_is_the_median_of_single_calls(monkeypatch):
    """Each call is timed on its own after one untimed call; the median, in microseconds."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")  # (nothing to synchronize)
    calls, ticks = [], iter([0, 5, 10, 11, 20, 22])  # calls of 5, 1 and 2 us
    median = bench.host_us(lambda: calls.append(1), repeats=3, clock=lambda: next(ticks) * 1e-6)
    assert median == pytest.approx(2.0) and len(calls) == 4


def test_host_costs_without_cuda_compile_for_sm90_and_time_the_host(tmp_path):
    """`--host` on a machine without CUDA times the launchers inside `compile_only` (kernels
    compiled for sm_90, not launched) and writes where it measured."""
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("checks the compile-only path of a machine without CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, "-m", "headsteer.bench.kernels", "--host", "--repeats", "3",
                             "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["launched"] is False and "no GPU" in report["device"] and "--host" in report["command"]
    assert [row["launch"].split(" ", 1)[1] for row in report["host"]] == 2 * [
        "gate, SAE topk k=16, scale", "gate, no SAE", "sparse branch, usage 1.00", "sparse branch, usage 0.33"]
    assert all(row["host_us"] > 0 for row in report["host"])


def test_warm_up_arguments_are_checked_first(capsys):
    for args in (["--warm-up", "--jobs", "0"], ["--warm-up", "--seconds", "-1"], ["--host", "--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.main(args)
        assert "--jobs and --repeats must be at least 1" in capsys.readouterr().err


def test_defaults_of_the_warm_up_and_host_options(monkeypatch):
    """--jobs: one fewer than the CPUs, at least 1 and at most 16; --seconds 60; --repeats HOST_REPEATS."""
    for cpus, jobs in ((1, 1), (None, 1), (8, 7), (64, 16)):
        monkeypatch.setattr(bench.os, "cpu_count", lambda cpus=cpus: cpus)
        args = bench.parse_args(["--warm-up"])
        assert (args.mode, args.jobs, args.seconds) == ("warm_up", jobs, 60.0)
    args = bench.parse_args(["--host"])
    assert (args.mode, args.repeats) == ("host", bench.HOST_REPEATS) and bench.parse_args([]).mode == "table"
    assert bench.parse_args(["--warm-up", "--jobs", "3", "--seconds", "0.5"]).jobs == 3


@pytest.mark.parametrize("args, message", [
    (["--warm-up", "--seconds", "0"], "--seconds positive"), (["--warm-up", "--seconds", "nan"], "--seconds positive"),
    (["--warm-up", "--seconds", "inf"], "--seconds positive and finite"), (["--md", "x.md", "--repeats", "2"], "--repeats does not "
     "apply to the table (no mode option)"), (["--warm-up", "--json", "x"], "--json does not apply to --warm-up"),
    (["--gate-sweep", "--jobs", "2", "--md", "x"], "--md, --jobs does not apply to --gate-sweep")])
def test_bad_arguments_are_refused_saying_why(args, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(args)
    assert message in capsys.readouterr().err


def test_main_runs_the_mode_asked_for(tmp_path, monkeypatch, capsys):
    """With CUDA (faked here), each mode runs its function with its options; --breakdown writes
    its rows to --json; --host runs host_main with --repeats and --json."""
    import json

    ran = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    for name in ("warm_up", "profile_launches", "sweep", "gate_sweep", "table_main", "host_main"):
        monkeypatch.setattr(bench, name, lambda *a, name=name: ran.append((name, *a)) or 0)
    monkeypatch.setattr(bench, "breakdown", lambda: ran.append(("breakdown",)) or {"breakdown": [{"qkv": 1.5}]})
    out = tmp_path / "b.json"
    for argv in (["--warm-up", "--jobs", "3", "--seconds", "7"], ["--profile"], ["--sweep"], ["--gate-sweep"],
                 ["--breakdown", "--json", str(out)], ["--host", "--repeats", "5", "--json", str(out) + "2"]):
        assert bench.main(argv) == 0
    assert ran == [("warm_up", 3, 7.0), ("profile_launches",), ("sweep",), ("gate_sweep",), ("breakdown",),
                   ("host_main", 5, str(out) + "2", ["--host", "--repeats", "5", "--json", str(out) + "2"])]
    assert json.loads(out.read_text()) == {"breakdown": [{"qkv": 1.5}]}
    ran.clear()
    assert bench.main(["--breakdown"]) == 0 and bench.main(["--md", str(tmp_path / "t.md")]) == 0
    assert ran[0] == ("breakdown",) and ran[1][0] == "table_main" and ran[1][1].md == str(tmp_path / "t.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_table_main_prints_and_writes_the_table(tmp_path, monkeypatch, capsys):
    import json

    results = {"attention": [], "gate": []}
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(bench, "run_benchmark", lambda: results)
    argv = ["--json", str(tmp_path / "k.json"), "--md", str(tmp_path / "k.md")]
    bench.table_main(bench.parse_args(argv), argv)
    report = json.loads((tmp_path / "k.json").read_text())
    assert report.pop("device") == "a GPU" and report.pop("command") == "python -m headsteer.bench.kernels " + " ".join(argv)
    text = bench.markdown(results, "a GPU", report.pop("date"), "python -m headsteer.bench.kernels " + " ".join(argv))
    assert report == results and (tmp_path / "k.md").read_text() == text and capsys.readouterr().out == text + "\n"


def test_run_stamp_is_the_utc_minute_and_the_command(monkeypatch):
    import datetime
    import time

    assert bench.run_stamp([])[1] == "python -m headsteer.bench.kernels"
    assert bench.run_stamp(["--host", "--json", "h.json"])[1] == "python -m headsteer.bench.kernels --host --json h.json"
    monkeypatch.setattr(bench.sys, "argv", ["kernels.py", "--sweep"])
    assert bench.run_stamp(None)[1] == "python -m headsteer.bench.kernels --sweep"
    monkeypatch.setenv("TZ", "Asia/Kathmandu")  # (UTC+05:45: no whole hour off)
    time.tzset()
    try:
        stamp = datetime.datetime.strptime(bench.run_stamp([])[0], "%Y-%m-%d %H:%M UTC")
    finally:
        monkeypatch.undo()
        time.tzset()
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs(now - stamp) < datetime.timedelta(minutes=2)


def test_host_main_without_cuda_times_inside_compile_only_and_records_where(tmp_path, monkeypatch):
    import json

    from headsteer.kernels import aot

    if torch.cuda.is_available():
        pytest.skip("checks the compile-only path of a machine without CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (compile_only refuses the interpreter)
    monkeypatch.setattr(bench, "DEVICE", "cuda")
    seen = []
    monkeypatch.setattr(bench, "host_costs", lambda repeats: seen.append((repeats, bench.DEVICE, aot._COMPILE_ONLY_ARCH))
                        or [{"launch": "a", "host_us": 1.0}])
    argv = ["--host", "--repeats", "4", "--json", str(tmp_path / "h.json")]
    assert bench.host_main(4, str(tmp_path / "h.json"), argv) == 0
    assert seen == [(4, "cpu", 90)]
    report = json.loads((tmp_path / "h.json").read_text())
    assert report.pop("device").endswith(f" ({bench.os.cpu_count()} CPUs), no GPU") and report.pop("date")
    import triton

    assert report == dict(command="python -m headsteer.bench.kernels " + " ".join(argv), torch=torch.__version__,
                          triton=triton.__version__, launched=False, host=[{"launch": "a", "host_us": 1.0}])
    assert bench.host_main(4, None, None) == 0 and len(seen) == 2


def test_markdown_rows_hold_each_number_in_its_column():
    attention = dict(model="ViT-S", heads=6, dim=384, usage=0.33, heads_kept=2, dense_us=100.04, sparse_us=40.06,
                     speedup=2.4974, dense_graph_us=90.0, sparse_graph_us=30.0, speedup_graph=3.0)
    gate = dict(model="ViT-S", sae="none", gate_us=5.0, block_us=200.0, share=0.025, gate_graph_us=4.0,
                block_graph_us=160.0, share_graph=0.025, gate_cold_graph_us=6.0, block_cold_graph_us=150.0,
                share_cold_graph=0.04)
    text = bench.markdown({"attention": [attention], "gate": [gate]}, "an H100", "2026-11-28 00:00 UTC", "python -m x")
    assert "| ViT-S | 0.33 | 2/6 | 100.0 | 40.1 | 2.50x | 90.0 | 30.0 | 3.00x |" in text.splitlines()
    assert "| ViT-S | none | 5.0 | 200.0 | 2.5% | 4.0 | 160.0 | 2.5% | 6.0 | 150.0 | 4.0% |" in text.splitlines()
    assert "Measured on an H100, 2026-11-28 00:00 UTC, with `python -m x`" in text and f"Targets: {bench.TARGETS}." in text


def test_modes_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sweep", "--breakdown"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--sweep", "--json", "x.json"], ["--gate-sweep", "--json", "x.json"],
                                  ["--profile", "--json", "x.json"], ["--warm-up", "--json", "x.json"],
                                  ["--breakdown", "--md", "x.md"], ["--host", "--md", "x.md"], ["--jobs", "2"],
                                  ["--seconds", "3"], ["--repeats", "3"], ["--sweep", "--jobs", "2"],
                                  ["--breakdown", "--repeats", "3"]])
def test_options_that_do_not_apply_to_the_mode_are_refused(args, capsys, monkeypatch):
    monkeypatch.setattr(bench, "host_main", lambda *a: pytest.fail("ran before the arguments were checked"))
    with pytest.raises(SystemExit):
        bench.main(args)
    assert "does not apply to" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--breakdown"], ["--host"]])
def test_report_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch, mode):
    monkeypatch.setattr(bench, "host_main", lambda *a: pytest.fail("ran before the paths were checked"))
    (tmp_path / "file").write_text("x")
    for path in (tmp_path, tmp_path / "file" / "k.json"):
        with pytest.raises(SystemExit):
            bench.main([*mode, "--json", str(path)])
        assert "--json" in capsys.readouterr().err
        if not mode:  # (the table also writes --md)
            with pytest.raises(SystemExit):
                bench.main(["--md", str(path)])
            assert "--md" in capsys.readouterr().err


def test_gpu_checks_invocations_are_valid(tmp_path):
    """Every `python -m headsteer.bench.kernels` line of bench/gpu_checks.sh parses, in the mode it means."""
    import re
    import shlex
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.sh").read_text()
    found = re.findall(r"python -m headsteer\.bench\.kernels(.*)$", script, re.MULTILINE)
    modes = []
    for rest in found:
        rest = rest.replace("$workers", "4").replace("$dir", str(tmp_path))
        modes.append(bench.parse_args(shlex.split(rest)).mode)
    assert modes == ["warm_up", "table", "breakdown", "profile", "sweep", "gate_sweep"]


def test_flops_count_the_padded_patches_of_a_dynamic_img_pad_model():
    """timm pads each side up to a multiple of the patch (`dynamic_img_pad`), so a 200-pixel
    image is 13 x 13 patches of 16, not 12 x 12: FLOPs as torch's counter counts the forward."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from headsteer.bench.flops import vit_flops

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=200, dynamic_img_size=True,
                            dynamic_img_pad=True, depth=2, num_classes=10).eval()
    for block in vit.blocks:
        block.attn.fused_attn = False  # (the counter does not count the fused attention's products)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vit(torch.zeros(1, 3, 200, 200))
    counts = vit_flops(vit)
    assert counts.tokens == 13 * 13 + 1
    assert counts.total == counter.get_total_flops()


# ---- stand-ins for the kernels: what each timed call is given (the calls themselves run elsewhere) ----


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replaces the sparse branch and the fused gate by recorders (nothing compiled or
    interpreted): each call appends what it was given, and the tile and gate constants in force."""
    from headsteer.kernels import triton_head_attention as attention
    from headsteer.kernels import triton_sae_gate as gate

    calls = []

    def sparse(x, keep, w, heads):
        calls.append(dict(kind="sparse", kept=keep.sum(1).tolist(), heads=heads, tiles=attention.TILES))
        return torch.zeros_like(x)

    def steer_gate(e, gate_params, sae, scale=None, shift=None, mode="preserve-error", budget=None):
        calls.append(dict(kind="gate", e=e, gate=gate_params, sae=sae, scale=scale, shift=shift, budget=budget,
                          block_s=gate.BLOCK_S, warps=gate.GATE_WARPS))
        return e.float(), None

    monkeypatch.setattr(bench, "sparse_attention", sparse)
    monkeypatch.setattr(gate, "triton_sae_steer_gate", steer_gate)
    return calls


def test_benchmark_rows_hold_what_was_timed(tiny, kernel_calls, monkeypatch):
    """Each row's numbers are the timings of its own calls (the fake timer numbers its calls:
    eager n, graph n/2) and the ratios of those: the dense branch timed once per model, before the
    sparse one at each usage; each gate with its own SAE and steering; the cold columns time
    the same calls as the warm ones."""
    monkeypatch.setattr(bench, "MODELS", {"tiny": (6, 48)})
    cold = []

    def fake_cold(fn, rep_ms=bench.GRAPH_REP_MS):
        cold.append(fn())
        tiny.append(fn)
        return 100.0 + len(tiny)

    monkeypatch.setattr(bench, "graph_timed_cold", fake_cold)
    results = bench.run_benchmark()
    attention = results["attention"]
    assert [r["heads_kept"] for r in attention] == [6, 4, 3, 2, 1]
    assert [c["kept"] for c in kernel_calls if c["kind"] == "sparse"] == [[k] * bench.BATCH for k in (6, 4, 3, 2, 1)]
    for n, r in enumerate(attention, start=2):
        assert (r["model"], r["heads"], r["dim"]) == ("tiny", 6, 48)
        assert (r["dense_us"], r["dense_graph_us"], r["sparse_us"], r["sparse_graph_us"]) == (1.0, 0.5, n, n / 2)
        assert r["speedup"] == pytest.approx(1.0 / n) and r["speedup_graph"] == pytest.approx(0.5 / (n / 2))
    gates = [c for c in kernel_calls if c["kind"] == "gate"]
    # each gate called eagerly, then cold, with the same arguments
    assert all(all(a is b for a, b in zip(eager.values(), cold.values())) for eager, cold in zip(gates[::2], gates[1::2]))
    gates = gates[::2]
    assert [(g["sae"] is None, g["scale"] is None, g["shift"] is None, g["budget"]) for g in gates] == [
        (True, True, True, None), (False, False, True, None), (False, False, False, None)]
    assert gates[2]["scale"].float().mean() == pytest.approx(1.0, abs=0.1)  # the scale, not the shift
    assert gates[2]["shift"].float().mean() == pytest.approx(0.0, abs=0.1)
    # block: eager call 7, cold call 8; gates: eager 9, 11, 13, each cold right after it
    for n, r in zip((9, 11, 13), results["gate"]):
        assert (r["gate_us"], r["gate_graph_us"], r["block_us"], r["block_graph_us"]) == (n, n / 2, 7.0, 3.5)
        assert (r["gate_cold_graph_us"], r["block_cold_graph_us"]) == (101.0 + n, 108.0)
        assert r["share"] == pytest.approx(n / 7) and r["share_graph"] == pytest.approx(n / 7)
        assert r["share_cold_graph"] == pytest.approx((101 + n) / 108)
    block_eager = tiny[6]()
    assert torch.equal(cold[0], block_eager) and block_eager.shape == (bench.BATCH, bench.TOKENS, 48)


def test_dense_block_is_a_timm_block():
    """`dense_block` (and its attention branch) compute timm's pre-norm ViT block with
    `make_block`'s weights, which are scaled like trained ones (unit-variance outputs)."""
    from timm.models.vision_transformer import Block

    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    heads, dim = 4, 64
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "DEVICE", "cpu")
        patch.setattr(bench, "DTYPE", torch.float32)
        w = bench.make_block(heads, dim, generator)
    block = Block(dim, heads, qkv_bias=True).eval()
    names = dict(norm1_w="norm1.weight", norm1_b="norm1.bias", norm2_w="norm2.weight", norm2_b="norm2.bias",
                 qkv_w="attn.qkv.weight", qkv_b="attn.qkv.bias", proj_w="attn.proj.weight", proj_b="attn.proj.bias",
                 fc1_w="mlp.fc1.weight", fc1_b="mlp.fc1.bias", fc2_w="mlp.fc2.weight", fc2_b="mlp.fc2.bias")
    block.load_state_dict({names[key]: value for key, value in w.items()})
    x = torch.randn(3, 9, dim)
    with torch.no_grad():
        torch.testing.assert_close(bench.dense_block(x, w, heads), block(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bench.dense_attention(x, w, heads), block.attn(x), atol=1e-4, rtol=1e-4)
        with pytest.MonkeyPatch.context() as patch:  # the sparse branch keeping every head: the same
            patch.setattr(bench, "DEVICE", "cpu")
            keep = bench.random_keep(1, heads, 1.0, generator)
        torch.testing.assert_close(bench.sparse_attention(x[:1], keep, w, heads), block.attn(x[:1]), atol=1e-4, rtol=1e-4)
    for key, value in w.items():
        if key.endswith("_w") and value.dim() == 2:  # Linear weights: std fan_in**-0.5
            assert value.std() * value.shape[1] ** 0.5 == pytest.approx(1.0, abs=0.15), key
        elif key.endswith("_b"):
            assert value.std() == pytest.approx(0.1, abs=0.04), key
        else:
            assert value.mean() == pytest.approx(1.0, abs=0.3), key


def test_gate_params_are_the_runtime_defaults(monkeypatch):
    """G = D/4 gate, then the S = 4D TopK k=16 SAE (unit-norm decoder rows) with a per-sample
    steering scale (around 1) and shift (around 0)."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "BATCH", 5)
    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    gate, sae, steering = bench.gate_params(64, 4, generator, False)
    assert sae is None and steering == (None, None)
    assert (gate["fc1_weight"].shape, gate["fc2_weight"].shape, gate["fc2_bias"].shape) == ((16, 64), (4, 16), (4,))
    gate, sae, (scale, shift) = bench.gate_params(64, 4, generator, True)
    assert gate["norm_weight"].dtype == bench.DTYPE and gate["fc1_weight"].shape == (16, 64)
    assert (sae["activation"], sae["k"], sae["threshold"]) == ("topk", 16, None)
    assert sae["enc_weight"].shape == (256, 64) and sae["dec_weight"].shape == (256, 64)
    torch.testing.assert_close(sae["dec_weight"].float().norm(dim=1), torch.ones(256), atol=1e-2, rtol=0)
    assert scale.shape == shift.shape == (5, 256)
    assert scale.float().mean() == pytest.approx(1.0, abs=0.1) and shift.float().mean() == pytest.approx(0, abs=0.05)


def test_sweep_times_each_fitted_tiling_at_usage_1_and_0_33(tiny, kernel_calls, capsys, monkeypatch):
    """The defaults first, then variants that differ from them; each timing runs the tiles its line
    names (fitted to the head size), on masks keeping every head, then round(0.33 * H)."""
    from headsteer.kernels import triton_head_attention as attention

    monkeypatch.setattr(bench, "MODELS", {"tiny": (6, 48)})
    variants = bench.sweep_variants()
    assert variants[0] is attention.TILES and all(v != attention.TILES for v in variants[1:])
    bench.sweep()
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(kernel_calls) == 2 * len(lines)
    for line, (full, third) in zip(lines, zip(kernel_calls[::2], kernel_calls[1::2])):
        assert (full["kept"], third["kept"]) == ([6] * bench.BATCH, [2] * bench.BATCH)
        assert full["tiles"] is third["tiles"] and line.endswith(f"  {full['tiles']}")


def test_gate_sweep_times_each_variant_on_its_three_gates(tiny, kernel_calls, capsys):
    """Under each variant's constants: the SAE with a steering scale, with a scale and a shift,
    then the gate alone."""
    from headsteer.kernels import triton_sae_gate as gate

    variants = [dict(BLOCK_S=64), dict(GATE_WARPS=4)]
    bench.gate_sweep(variants)
    assert len(capsys.readouterr().out.splitlines()) == 2 and len(kernel_calls) == 6
    assert [(c["block_s"], c["warps"]) for c in kernel_calls] == 3 * [(64, gate.GATE_WARPS)] + 3 * [(gate.BLOCK_S, 4)]
    for sae, shift, alone in zip(kernel_calls[::3], kernel_calls[1::3], kernel_calls[2::3]):
        assert sae["sae"] is shift["sae"] is not None and sae["scale"] is shift["scale"] is not None
        assert sae["shift"] is None and shift["shift"] is not None and alone["sae"] is alone["scale"] is None
        assert sae["scale"].float().mean() == pytest.approx(1.0, abs=0.1)  # the scale, not the shift
        assert alone["gate"] is not sae["gate"]  # (a gate of its own)


def test_launch_cases_launch_what_their_labels_say(tiny, kernel_calls, monkeypatch):
    monkeypatch.setattr(bench, "MODELS", {"tiny": (6, 48)})
    dense = []
    monkeypatch.setattr(bench, "dense_attention", lambda x, w, heads: dense.append(heads))
    for _, launch in bench.launch_cases():
        launch()
    with_sae, alone, full, third = kernel_calls
    assert with_sae["sae"]["k"] == 16 and with_sae["scale"] is not None and with_sae["shift"] is None
    assert alone["sae"] is alone["scale"] is alone["shift"] is None
    assert with_sae["gate"]["fc1_weight"] is not alone["gate"]["fc1_weight"]
    assert (full["kept"], third["kept"]) == ([6] * bench.BATCH, [2] * bench.BATCH) and dense == [6]


def test_warm_up_stand_ins_launch_once_and_return_placeholders(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    calls = []
    assert bench._launch_once(lambda: calls.append(1)) == 1.0 and calls == [1]
    assert bench._launch_once_eager_and_graph(lambda: calls.append(2)) == (1.0, 1.0) and calls == [1, 2]
