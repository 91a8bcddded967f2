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


def test_breakdown_times_each_kernel(tiny, capsys):
    results = bench.breakdown()
    rows = results["breakdown"]
    assert [(r["branch"], r["usage"]) for r in rows] == [("dense", None)] + [("sparse", u) for u in bench.USAGES + (0.0,)]
    for row in rows:
        assert set(row) - {"model", "usage", "branch", "total"} == set(bench.BREAKDOWN_STAGES)
        assert row["total"] == pytest.approx(sum(row[stage] for stage in bench.BREAKDOWN_STAGES))
    printed = capsys.readouterr().out.splitlines()  # the table, row by row as measured
    assert printed == bench.BREAKDOWN_HEADER.splitlines() + [bench.breakdown_row(row) for row in rows]


def test_dense_stages_compute_the_dense_branch(tiny):
    generator = torch.Generator().manual_seed(3)
    w = bench.make_block(2, 32, generator)
    x = torch.randn(3, 9, 32, generator=generator).to(bench.DEVICE, bench.DTYPE)
    (_, qkv), (_, attention), (_, proj) = bench.dense_stages(x, w, 2)
    assert qkv().shape == (3, 9, 96)
    assert proj().shape == (3, 9, 32)
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


def test_warm_up_runs_tasks_in_parallel_processes_and_reports_each(capsys):
    from tests.bench.warm_up_tasks import sleep_task

    assert bench.warm_up(2, 300, task_function=sleep_task, tasks=[("short", 0), ("fail", 0), ("short", 0.5)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and sum("RuntimeError: planned failure" in line for line in lines) == 1
    assert sum(line.endswith("short 0.5") for line in lines) == 1


def test_warm_up_stops_at_its_limit_and_ends_its_workers(capsys):
    import time

    from tests.bench.warm_up_tasks import sleep_task

    start = time.monotonic()
    assert bench.warm_up(1, 2, task_function=sleep_task, tasks=[("long", 600), ("long", 600)]) == 0
    assert time.monotonic() - start < 60  # the sleeping worker was terminated, not waited for
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
