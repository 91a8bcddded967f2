"""The bench harness on a tiny ViT: report schema, FLOP accounting against a hand count, atomic
report files, CLI parsing. No timing assertions: speed is measured by `headsteer bench`, never by
a timed test."""
import argparse
import json
import os

import pytest
import torch

from headsteer.bench import harness
from headsteer.bench.flops import ideal_speedup, vit_flops

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)

# Hand count for TINY (2 FLOPs per multiply-add): 16 patches + class token = 17 tokens, d = 16.
PATCH = 2 * 16 * (3 * 8 * 8) * 48
QKV, SCORES, PROJ, MLP = 2 * 17 * 48 * 144, 2 * 2 * 17 * 17 * 48, 2 * 17 * 48 * 48, 2 * (2 * 17 * 48 * 96)
HEAD = 2 * 48 * 7
TOTAL = PATCH + 2 * (QKV + SCORES + PROJ + MLP) + HEAD  # 1,659,936
PER_HEAD = 2 * 17 * 48 * 48 + 2 * 2 * 17 * 17 * 16 + 2 * 17 * 16 * 48  # qkv rows, q k^T and (.)v, proj columns


def _hand_ideal(kept_per_block, blocks=2, heads=3):
    skipped = blocks * (heads - kept_per_block) * PER_HEAD
    return TOTAL / (TOTAL - skipped)


@pytest.fixture(scope="module")
def report():
    config = harness.BenchConfig(
        model="vit_tiny_patch16_224",
        timm_kwargs=TINY,
        backends=["timm", "reference", "compact"],
        batches=(1, 3),
        usages=(1.0, 0.67, 0.33, 0.0),
        reps=2,
        warmup=1,
        gate=True,
        calibration_samples=8,
        progress=False,
        quick=True,
    )
    return harness.run_bench(config)


def test_flop_count_matches_hand_count():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    counts = vit_flops(vit)
    assert counts.tokens == 17
    assert counts.total == TOTAL == 1_659_936
    assert counts.head_flops(0) == counts.head_flops(1) == PER_HEAD
    batch = 4
    assert ideal_speedup(counts, torch.ones(batch, 2, 3, dtype=torch.bool), [0, 1], batch) == 1.0
    assert ideal_speedup(counts, None, [0, 1], batch) == 1.0  # a dense row has no mask
    mask = torch.ones(batch, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = mask[2, 1, 0] = mask[2, 1, 2] = False  # 3 pruned (sample, block, head) triples
    expected = batch * TOTAL / (batch * TOTAL - 3 * PER_HEAD)
    assert ideal_speedup(counts, mask, [0, 1], batch) == pytest.approx(expected, rel=1e-12)
    everything = torch.zeros(batch, 2, 3, dtype=torch.bool)
    assert ideal_speedup(counts, everything, [0, 1], batch) == pytest.approx(_hand_ideal(0), rel=1e-12)


def test_report_schema(report):
    env = report["environment"]
    for key in ("date", "torch", "threads", "cpu", "device", "model", "weights", "reps", "clock"):
        assert key in env, key
    assert "random" in env["weights"]
    assert env["threads"] == torch.get_num_threads()
    rows = report["rows"]
    assert rows
    for row in rows:
        assert set(harness.ROW_KEYS) <= set(row)
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] * 0.999 and row["p99_ms"] >= row["p90_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3, rel=1e-2)
        # (all three are rounded to 4 decimals: a small efficiency is off by up to 5e-5 absolute)
        assert row["efficiency"] == pytest.approx(row["speedup_vs_timm"] / row["ideal_speedup"], rel=1e-3, abs=1e-4)
        assert row["img_size"] == 32
        assert row["reps"] == 2  # every cell timed once per repetition
    json.dumps(report)  # serializable as is
    forced = {(r["backend"], r["batch"], r["target_usage"]) for r in rows if r["mode"] == "budget"}
    for backend in ("reference", "compact"):
        for batch in (1, 3):
            for usage in (1.0, 0.67, 0.33, 0.0):
                assert (backend, batch, usage) in forced
    timm_rows = [r for r in rows if r["backend"] == "timm"]
    assert len(timm_rows) == 2 and all(r["speedup_vs_timm"] == 1.0 and r["ideal_speedup"] == 1.0 for r in timm_rows)


def test_ideal_speedup_from_measured_masks(report):
    # round(u * 3) heads kept per block: 1.0 -> 3, 0.67 -> 2, 0.33 -> 1, 0.0 -> 0.
    kept = {1.0: 3, 0.67: 2, 0.33: 1, 0.0: 0}
    for row in report["rows"]:
        if row["mode"] != "budget":
            continue
        k = kept[row["target_usage"]]
        assert row["usage"] == pytest.approx(k / 3, abs=1e-4)
        assert row["ideal_speedup"] == pytest.approx(_hand_ideal(k), rel=1e-4)
        if k == 3:
            assert row["ideal_speedup"] == 1.0
        else:
            assert row["ideal_speedup"] > 1.0


def test_gate_deciding_rows(report):
    gate = [r for r in report["rows"] if r["mode"] == "gate"]
    assert {r["backend"] for r in gate} == {"reference", "compact"}
    for row in gate:
        assert row["usage_min"] <= row["usage"] <= row["usage_max"]
        if row["target_usage"] == 1.0:
            assert row["usage"] == 1.0 and row["ideal_speedup"] == 1.0
        if row["target_usage"] == 0.0:
            assert row["usage"] == 0.0 and row["ideal_speedup"] == pytest.approx(_hand_ideal(0), rel=1e-4)
    # Each backend's ideal comes from its own measured mask: reference and compact may differ by a
    # head where a calibrated gate logit sits within float rounding of the threshold.
    for row in gate:
        assert row["ideal_speedup"] >= 1.0


def test_reports_are_written_atomically(report, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        assert os.path.exists(src) and os.path.getsize(src) > 0
        real_replace(src, dst)

    monkeypatch.setattr(harness.os, "replace", spy)
    md, js, png = tmp_path / "out" / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    harness.write_markdown(report, md)
    harness.write_json(report, js)
    harness.write_plot(report, png)
    assert [dst for _, dst in renames] == [str(md), str(js), str(png)]
    for src, dst in renames:
        assert os.path.dirname(src) == os.path.dirname(dst) and src != dst
    assert "| compact |" in md.read_text() and "speed-up vs timm" in md.read_text()
    assert md.read_text().endswith("|\n\n") and js.read_text().endswith("}\n")  # text files end in a newline
    assert json.loads(js.read_text())["rows"] == report["rows"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "r.json", "r.md", "r.png"]  # no temp files left


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "r.md"
    path.write_text("old")

    def boom(temp):
        with open(temp, "w") as handle:
            handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        harness._atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


def test_unavailable_backend_is_skipped_with_reason():
    def factory(name, model, device):
        raise harness.BackendUnavailable("needs a flux capacitor")

    harness.register_backend("flux", factory)
    try:
        config = harness.BenchConfig(model="vit_tiny_patch16_224", timm_kwargs=TINY, backends=["flux", "compact"],
                                     batches=(2,), usages=(0.33,), reps=1, warmup=1, progress=False)
        report = harness.run_bench(config)
    finally:
        harness.BACKEND_FACTORIES.pop("flux")
    assert report["environment"]["backends_skipped"] == {"flux": "needs a flux capacitor"}
    assert {r["backend"] for r in report["rows"]} == {"timm", "compact"}  # timm is always the baseline
    assert "Skipped: flux: needs a flux capacitor" in harness.markdown(report)


def test_cli_arguments_and_run(tmp_path, monkeypatch, report):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--model", "vit_small_patch16_224", "--batch", "8,1", "--usage", "1,0.5,0",
                              "--backends", "timm,compact", "--threads", "2", "--quick", "--gate",
                              "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")])
    config = harness.config_from_args(args)
    assert config.batches == [8, 1] and config.usages == [1.0, 0.5, 0.0] and config.backends == ["timm", "compact"]
    assert config.quick and config.reps < harness.BenchConfig().reps and config.gate and config.threads == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", "--usage", "1.5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", "--bundle", "y"])
    monkeypatch.setattr(harness, "run_bench", lambda config: report)
    assert harness.run(args) == 0
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()
    assert harness.main_from_args is harness.run


@pytest.mark.parametrize("option, text", [("--batch", "1,,2"), ("--batch", "1,2,"), ("--batch", ","),
                                          ("--img-size", "64, ,32"), ("--usage", "1,,0"),
                                          ("--backends", "timm,,compact")])
def test_cli_lists_refuse_an_empty_item(option, text, capsys):
    """`--batch 1,,2` read as [1, 2]: an empty item (a typo for a missing number) is refused, naming it."""
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", option, text])
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and "empty item" in err and repr(text) in err, err


@pytest.mark.parametrize("option, text", [("--batch", "0"), ("--img-size", "32,0"), ("--usage", "-0.5")])
def test_cli_lists_refuse_values_out_of_range(option, text):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", option, text])


def test_cli_reps_and_warmup_override_quick():
    args = _cli_args(None, "--reps", "7", "--warmup", "0", "--no-progress")
    config = harness.config_from_args(args)
    assert (config.reps, config.warmup, config.calibration_samples, config.progress) == (7, 0, 8, False)


def test_cli_reports_a_refused_setting_on_one_line(capsys, monkeypatch):
    monkeypatch.setattr(harness, "_load_model", lambda *args: pytest.fail("work started before the check"))
    assert harness.main(["--model", "vit_tiny_patch16_224", "--reps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headsteer bench: error: --reps must be") and err.count("\n") == 1, err


def test_bundle_source(tmp_path):
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    path = save_bundle(model, tmp_path / "bundle")
    config = harness.BenchConfig(bundle=str(path), backends=["compact"], batches=(2,), usages=(0.33,),
                                 reps=1, warmup=1, progress=False, dtype="bfloat16")  # (the bundle's model cast too)
    report = harness.run_bench(config)
    assert "bundle" in report["environment"]["model"] and "trained" in report["environment"]["weights"]
    assert {r["backend"] for r in report["rows"]} == {"timm", "compact"}
    with pytest.raises(Exception, match="img-size"):
        harness.run_bench(harness.BenchConfig(bundle=str(path), img_sizes=(64,), batches=(1,), reps=1, progress=False))


# -- settings refused before any work ----------------------------------------------------------------
def _no_work(monkeypatch):
    """Make building a model or timing a batch fail the test: a refusal must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(harness, "_load_model", forbidden)
    monkeypatch.setattr(harness, "_bench_batch", forbidden)


def _tiny_config(**overrides):
    values = dict(model="vit_tiny_patch16_224", timm_kwargs=TINY, backends=["compact"], batches=(2,),
                  usages=(0.33,), reps=1, warmup=1, progress=False)
    values.update(overrides)
    return harness.BenchConfig(**values)


BAD_SETTINGS = [
    (dict(reps=0), "--reps"),
    (dict(reps=-3), "--reps"),
    (dict(warmup=-2), "--warmup"),
    (dict(threads=0), "--threads"),
    (dict(threads=-1), "--threads"),
    (dict(device="foo"), "not a device"),
    (dict(device="mps"), "cpu or cuda only"),
    (dict(batches=(0,)), "batch"),
    (dict(usages=(1.5,)), r"\[0, 1\]"),
    (dict(dtype="float64"), "dtype"),
    (dict(clock="process", device="cpu", threads=2), "one thread"),
    (dict(bundle="some/bundle"), "exactly one"),
    (dict(batches=()), "batch"),
    (dict(batches=(True,)), "batch"),
    (dict(img_sizes=(0,)), "image sizes"),
    (dict(calibration_samples=0), "calibration_samples"),
    (dict(usages=()), r"\[0, 1\]"),
    (dict(usages=(-0.1,)), r"\[0, 1\]"),
    (dict(clock="cpu"), "clock must be"),
    (dict(model=42), "timm model name or a module"),
    (dict(model=None, bundle="some/bundle"), "timm_kwargs cannot apply to a bundle"),
    (dict(backends=["nope"]), "unknown backend"),
]


def test_process_clock_is_refused_on_cuda(monkeypatch):
    """With CUDA present (mocked, so the device check passes), the process clock is still refused:
    it would time kernel launches, not the GPU's work."""
    from headsteer.runtime.errors import InputError

    _no_work(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="--clock process"):
        harness.run_bench(_tiny_config(clock="process", device="cuda", threads=1))


@pytest.mark.parametrize("overrides, message", BAD_SETTINGS, ids=[str(o) for o, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_work(monkeypatch, overrides, message):
    from headsteer.runtime.errors import InputError

    _no_work(monkeypatch)
    with pytest.raises(InputError, match=message):
        harness.run_bench(_tiny_config(**overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused(monkeypatch):
    from headsteer.runtime.errors import InputError

    _no_work(monkeypatch)
    with pytest.raises(InputError, match="no CUDA device"):
        harness.run_bench(_tiny_config(device="cuda"))


def test_process_clock_runs_on_one_cpu_thread():
    assert harness.check_config(_tiny_config(clock="process", device="cpu", threads=1)).type == "cpu"


def test_process_clock_counts_torch_threads_when_none_are_given(monkeypatch):
    from headsteer.runtime.errors import InputError

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    with pytest.raises(InputError, match="with 4 threads"):
        harness.check_config(_tiny_config(clock="process", device="cpu"))


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    from headsteer.runtime.errors import InputError

    _no_work(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"only 1 CUDA device"):
        harness.run_bench(_tiny_config(device="cuda:1"))


def test_a_timm_module_takes_gated_kwargs():
    """A plain timm module is wrapped by the bench, so gated_kwargs apply to it (unlike a GatedViT)."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    config = _tiny_config(model=vit, timm_kwargs={}, gated_kwargs=dict(sae_blocks="none"))
    assert harness.check_config(config).type == "cpu"


def test_image_sizes_are_checked_before_anything_is_timed(monkeypatch, tmp_path):
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.errors import InputError
    from headsteer.runtime.gated_vit import GatedViT

    def forbidden(*args, **kwargs):
        raise AssertionError("timed before the image sizes were checked")

    monkeypatch.setattr(harness, "_bench_batch", forbidden)
    with pytest.raises(InputError, match="smaller than the model's 8x8 patch"):
        harness.run_bench(_tiny_config(img_sizes=(32, 4)))
    path = save_bundle(GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval(), tmp_path / "bundle")
    with pytest.raises(InputError, match="--img-size 64 does not match"):
        harness.run_bench(_tiny_config(model=None, timm_kwargs={}, bundle=str(path), img_sizes=(32, 64)))


def test_an_image_of_one_patch_is_accepted():
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY)
    harness._check_img_sizes(_tiny_config(img_sizes=(8,)), model)  # the 8x8 patch itself: one token of image


def test_zero_warmups_report_the_untimed_call_that_ran(capsys):
    report = harness.run_bench(_tiny_config(warmup=0))
    assert capsys.readouterr().err == ""  # (progress=False: no progress bar)
    assert report["environment"]["warmup"] == 1
    assert "after 1 warm-up" in harness.markdown(report)


# -- a module given as the model ---------------------------------------------------------------------
def test_a_module_input_is_left_as_it_was(monkeypatch):
    from headsteer.runtime.errors import InputError
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    config = _tiny_config(model=model, timm_kwargs={}, dtype="bfloat16", threads=1, backends=["reference"])
    report = harness.run_bench(config)
    assert {r["backend"] for r in report["rows"]} == {"timm", "reference"}
    assert report["environment"]["threads"] == 1  # measured with the threads asked for
    assert torch.get_num_threads() == threads  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was not reseeded
    after = model.state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor) for name, tensor in before.items())
    _no_work(monkeypatch)
    for overrides in (dict(img_sizes=(32,)), dict(timm_kwargs=dict(img_size=32)), dict(gated_kwargs=dict(sae_blocks="none"))):
        with pytest.raises(InputError, match="cannot apply to a model given as a module"):
            harness.run_bench(_tiny_config(**{"timm_kwargs": {}, **overrides, "model": model}))


def test_threads_are_restored_after_a_failed_run(monkeypatch):
    threads = torch.get_num_threads()

    def boom(*args, **kwargs):
        raise RuntimeError("planned")

    monkeypatch.setattr(harness, "_bench_batch", boom)
    with pytest.raises(RuntimeError, match="planned"):
        harness.run_bench(_tiny_config(threads=1 if threads != 1 else 2))
    assert torch.get_num_threads() == threads


# -- reports ----------------------------------------------------------------------------------------
def _row(backend, mode, usage=1.0, **extra):
    row = dict(backend=backend, batch=1, img_size=32, usage=usage, median_ms=1.0, p90_ms=1.0, p99_ms=1.0,
               images_per_s=1000.0, speedup_vs_timm=1.0, ideal_speedup=1.0, efficiency=1.0, mode=mode,
               target_usage=usage, reps=1)
    row.update(extra)
    return row


def test_markdown_always_shows_the_dense_baseline(report):
    env = dict(report["environment"], backends_skipped={})
    only_timm = harness.markdown(dict(environment=env, rows=[_row("timm", "dense")]))
    assert "| timm | 1 | 32 |" in only_timm
    gate_only = harness.markdown(dict(environment=env, rows=[_row("timm", "dense"),
                                                             _row("onnxruntime", "gate", 0.5, usage_min=0.4, usage_max=0.6)]))
    section = gate_only.split("**Gate deciding")[1]
    assert "| timm | 1 | 32 |" in section and "| onnxruntime | 1 | 32 | 0.50 (0.40-0.60) |" in section


def test_gate_rows_of_a_model_without_gates_are_finite_json(tmp_path):
    report = harness.run_bench(_tiny_config(gated_kwargs=dict(gate_blocks="none", sae_blocks="none"), gate=True,
                                            usages=(0.5,)))
    gate = [r for r in report["rows"] if r["mode"] == "gate"]
    assert gate and all(r["usage"] == 1.0 and r["ideal_speedup"] == 1.0 for r in gate)
    harness.write_json(report, tmp_path / "r.json")
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert "nan" not in harness.markdown(report)
    nan_report = dict(report, rows=[dict(report["rows"][0], usage_min=float("nan"))])
    harness.write_json(nan_report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["usage_min"] is None


def _cli_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    return parser.parse_args(["--model", "vit_tiny_patch16_224", "--quick", *extra])


@pytest.mark.parametrize("bad", ["folder", "under_a_file", "plot_suffix", "same_file", "same_file_spelt_otherwise"])
def test_report_paths_are_checked_before_any_work(tmp_path, monkeypatch, bad):
    from headsteer.runtime.errors import InputError

    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    paths = dict(json=str(tmp_path / "r.json"), md=str(tmp_path / "r.md"), plot=str(tmp_path / "r.png"))
    paths.update({"folder": dict(json=str(tmp_path / "dir")), "under_a_file": dict(md=str(tmp_path / "file" / "r.md")),
                  "plot_suffix": dict(plot=str(tmp_path / "r.xyz")), "same_file": dict(md=paths["json"]),
                  "same_file_spelt_otherwise": dict(md=str(tmp_path / "dir" / ".." / "r.json"))}[bad])
    monkeypatch.setattr(harness, "run_bench", lambda config: pytest.fail("ran before the paths were checked"))
    args = _cli_args(tmp_path, "--json", paths["json"], "--md", paths["md"], "--plot", paths["plot"])
    with pytest.raises(InputError):
        harness.run(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # nothing written


def test_markdown_has_no_gate_section_without_gate_rows(report):
    env = dict(report["environment"], backends_skipped={})
    text = harness.markdown(dict(environment=env, rows=[_row("timm", "dense"), _row("compact", "budget", 0.5)]))
    assert "**Forced head usage" in text and "Gate deciding" not in text


def test_percentiles_interpolate_between_the_sorted_times():
    times = [5.0, 1.0, 4.0, 2.0, 3.0]  # (numpy.percentile's default, linear)
    assert harness._percentile(times, 50) == 3.0
    assert harness._percentile(times, 90) == pytest.approx(4.6)
    assert harness._percentile(times, 99) == pytest.approx(4.96)
    assert harness._percentile([7.0], 99) == 7.0


def test_rows_divide_the_timm_median_by_each_median():
    """Speed-up = timm's median / the cell's median (medians, not means: an outlier moves neither);
    the usage and ideal come from the cell's head mask, the per-sample range on gate rows only."""
    import types

    import timm

    counts = vit_flops(timm.create_model("vit_tiny_patch16_224", **TINY))
    device = torch.device("cpu")
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[0, :, 1:] = False  # sample 0 keeps 1 head per block, sample 1 all 3
    cells = [
        harness._Cell(harness.TimmRunner("timm", None, device), "dense", 1.0, None, times=[3.0, 1.0, 90.0]),
        harness._Cell(harness.GatedRunner("compact", None, device), "budget", 0.5, 0.5, times=[1.5, 0.5, 60.0],
                      head_mask=mask),
        harness._Cell(harness.GatedRunner("compact", None, device), "gate", 0.5, None, times=[1.0, 1.0, 1.0],
                      head_mask=mask),
    ]
    timm_row, budget, gate = harness._rows(cells, counts, types.SimpleNamespace(gate_blocks=[0, 1]), (32, 32), 2)
    assert timm_row["median_ms"] == 3.0 and timm_row["speedup_vs_timm"] == 1.0 and timm_row["usage"] == 1.0
    assert budget["median_ms"] == 1.5 and budget["speedup_vs_timm"] == 2.0 and budget["reps"] == 3
    assert budget["usage"] == pytest.approx(4 / 6, abs=1e-4)
    ideal = 2 * TOTAL / (2 * TOTAL - 4 * PER_HEAD)
    assert budget["ideal_speedup"] == pytest.approx(ideal, rel=1e-4)
    assert budget["efficiency"] == pytest.approx(2.0 / ideal, rel=1e-3)
    assert budget["images_per_s"] == pytest.approx(2 / 1.5e-3, rel=1e-4)
    assert "usage_min" not in budget and "usage_min" not in timm_row
    assert gate["speedup_vs_timm"] == 3.0
    assert gate["usage_min"] == pytest.approx(1 / 3, abs=1e-4) and gate["usage_max"] == 1.0


def test_plot_format_follows_the_suffix_png_without_one():
    assert harness.plot_format("report") == "png"
    assert harness.plot_format("report.SVG") == "svg"


def test_plot_is_written_in_the_format_its_suffix_names(report, tmp_path):
    harness.write_plot(report, tmp_path / "p.svg")
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:1000]
    harness.write_plot(report, tmp_path / "p.pdf")
    assert (tmp_path / "p.pdf").read_bytes().startswith(b"%PDF")


def test_a_failing_plot_writes_no_report(report, tmp_path, monkeypatch):
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    monkeypatch.setattr(harness, "run_bench", lambda config: report)
    args = _cli_args(tmp_path, "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md"),
                     "--plot", str(tmp_path / "r.png"))
    with pytest.raises(RuntimeError, match="matplotlib broke"):
        harness.run(args)
    assert list(tmp_path.iterdir()) == []


# -- backends that fail or cannot run -----------------------------------------------------------------
class _FailsAtOneUsage(harness.Runner):
    """compact, except that usage 0.33 raises a multi-line error."""

    def __call__(self, x, steer_scale, steer_shift, budget):
        if budget == 0.33:
            raise RuntimeError("first line of a long error\n  second line\n  third line")
        return self.model(x, steer_scale, steer_shift, budget=budget, backend="compact").head_mask


def test_a_failing_cell_is_reported_as_that_cell_on_one_line():
    harness.register_backend("flaky", _FailsAtOneUsage)
    try:
        report = harness.run_bench(_tiny_config(backends=["flaky"], usages=(1.0, 0.33), batches=(1, 2)))
    finally:
        harness.BACKEND_FACTORIES.pop("flaky")
    failure = report["environment"]["backends_failed"]["flaky"]
    assert failure == "failed at usage 0.33, batch 1, 32px (and 1 more cells): RuntimeError: first line of a long error"
    assert report["environment"]["backends_skipped"] == {}
    assert [(r["backend"], r["target_usage"]) for r in report["rows"] if r["mode"] == "budget"] == [("flaky", 1.0)] * 2
    text = harness.markdown(report)
    assert "Failed: flaky: failed at usage 0.33" in text and "second line" not in text


def test_a_failing_timm_baseline_stops_the_run_with_its_error(monkeypatch):
    """Every speed-up divides timm's median: a timm that cannot run is fatal, with its own error."""
    class Broken(harness.TimmRunner):
        def __call__(self, x, steer_scale, steer_shift, budget):
            raise RuntimeError("timm broke")

    monkeypatch.setitem(harness.BACKEND_FACTORIES, "timm", Broken)
    with pytest.raises(RuntimeError, match="timm broke"):
        harness.run_bench(_tiny_config())


def test_a_long_failure_reason_is_cut_to_300_characters():
    reason = harness._one_line(RuntimeError("x" * 1000 + "\nsecond line"))
    assert len(reason) == 300 and reason.startswith("RuntimeError: xxx") and reason.endswith("x...")


class _GateOnly(harness.Runner):
    """A backend that only runs the gate's threshold (like onnxruntime): no budget cells."""

    supports_budget = False

    def __call__(self, x, steer_scale, steer_shift, budget):
        assert budget is None, "a gate-only backend was given a head budget"
        return self.model(x, steer_scale, steer_shift, budget=None, backend="compact").head_mask


def test_a_gate_only_backend_is_skipped_without_gate(monkeypatch):
    monkeypatch.setitem(harness.BACKEND_FACTORIES, "gate-only", _GateOnly)
    report = harness.run_bench(_tiny_config(backends=["gate-only"]))
    assert report["environment"]["backends_skipped"] == {"gate-only": "runs the gate's threshold only: its rows appear with --gate"}
    assert "backends_failed" not in report["environment"]
    assert {r["backend"] for r in report["rows"]} == {"timm"}


class _Recording(harness.Runner):
    """compact, recording the budget of each call."""

    calls = []

    def __call__(self, x, steer_scale, steer_shift, budget):
        self.calls.append(budget)
        return self.model(x, steer_scale, steer_shift, budget=budget, backend="compact").head_mask


def test_each_repetition_runs_every_cell_once_in_a_fresh_order(monkeypatch):
    monkeypatch.setitem(harness.BACKEND_FACTORIES, "recording", _Recording)
    monkeypatch.setattr(_Recording, "calls", [])
    usages = (1.0, 0.67, 0.33, 0.0)
    harness.run_bench(_tiny_config(backends=["recording"], usages=usages, reps=4, warmup=1))
    calls = _Recording.calls
    assert calls[:4] == list(usages)  # the warm-up, in grid order
    repetitions = [calls[4 + 4 * i: 8 + 4 * i] for i in range(4)]
    assert len(calls) == 20 and all(sorted(rep) == sorted(usages) for rep in repetitions)
    assert len({tuple(rep) for rep in repetitions}) > 1  # shuffled per repetition


def test_calibrated_gate_keeps_each_head_on_about_the_target_share():
    """(Block 1 gated only: block 0's decision vector, the class token entering it, is the same for
    every image, so no per-image quantile can split its heads.)"""
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, gate_blocks=(1,)).eval()
    pixels = torch.randn(16, 3, 32, 32)
    steer = harness.steering_vectors(model, 16, "cpu")
    for target in (0.25, 1.0):
        harness.calibrate_gate(model, target, pixels, steer)
        with torch.inference_mode():
            mask = model(pixels, *steer, budget=None, backend="compact").head_mask
        assert mask.float().mean(dim=0).flatten().tolist() == pytest.approx([target] * 3, abs=0.07), target


def test_calibrated_gate_splits_heads_whose_logit_is_the_same_on_every_image():
    """Block 0's gate sees the class token entering it, the same for every image: no quantile can
    keep its heads on a share of the images, so the target share of those heads is kept on all of
    them (not whichever the rounding of a logit ~0 keeps)."""
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    pixels = torch.randn(16, 3, 32, 32)
    steer = harness.steering_vectors(model, 16, "cpu")
    with torch.inference_mode():
        raw = model(pixels[:1], *(v[:1] for v in steer), budget=None, backend="compact").gate_logits[0, 0]
        ranked = (raw - model.gates["0"].fc2.bias).argsort(descending=True).tolist()
    for target, kept in ((0.33, 1), (0.67, 2), (0.1, 0)):
        harness.calibrate_gate(model, target, pixels, steer)
        with torch.inference_mode():
            mask = model(pixels, *steer, budget=None, backend="compact").head_mask
        assert mask[:, 0].sum(dim=-1).tolist() == [kept] * 16, target
        assert sorted(mask[0, 0].nonzero().flatten().tolist()) == sorted(ranked[:kept])  # the highest logits


def test_calibrated_gate_splits_image_independent_heads_through_rounding_noise():
    """Another backend or batch size can round the same logit differently per image by an ulp or
    so: those heads are still image-independent, split by rank, not by the noise."""
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    pixels = torch.randn(16, 3, 32, 32)
    steer = harness.steering_vectors(model, 16, "cpu")
    noise = torch.Generator().manual_seed(1)

    class Noisy:
        gates, gate_blocks = model.gates, model.gate_blocks

        def __call__(self, *args, **kwargs):
            out = model(*args, **kwargs)
            out.gate_logits[:, 0] += 1e-6 * torch.randn(out.gate_logits[:, 0].shape, generator=noise)
            return out

    harness.calibrate_gate(Noisy(), 0.67, pixels, steer)
    with torch.inference_mode():
        mask = model(pixels, *steer, budget=None, backend="compact").head_mask
    assert mask[:, 0].sum(dim=-1).tolist() == [2] * 16


def test_steering_vectors_amplify_the_first_latents_of_each_sae_site():
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks=(0, 1), sae_width=16).eval()
    scale, shift = harness.steering_vectors(model, 2, "cpu")
    expected = torch.ones(2, 32)
    expected[:, 0:8] = expected[:, 16:24] = 2.0
    assert torch.equal(scale, expected) and torch.equal(shift, torch.zeros(2, 32))


def test_process_clock_reads_process_time_in_ms(monkeypatch):
    ticks = iter([10.0, 10.25])
    monkeypatch.setattr(harness.time, "process_time", lambda: next(ticks))
    elapsed, result = harness._Timer(torch.device("cpu"), "process")(lambda: "ran")
    assert (elapsed, result) == (250.0, "ran")


def test_onnxruntime_is_unavailable_for_16_bit_dtypes():
    pytest.importorskip("onnxruntime")
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval().to(torch.bfloat16)
    with pytest.raises(harness.BackendUnavailable) as unavailable:
        harness.OnnxRuntimeRunner("onnxruntime", model, torch.device("cpu"))
    assert "float32" in str(unavailable.value) and "\n" not in str(unavailable.value)


def test_onnxruntime_runs_the_gate_threshold_only_in_the_variant_named():
    pytest.importorskip("onnxruntime")
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    cpu = torch.device("cpu")
    assert harness.OnnxRuntimeRunner("onnxruntime", model, cpu).attention == "sparse"
    masked = harness.OnnxRuntimeRunner("onnxruntime-masked", model, cpu)
    assert masked.attention == "masked" and not masked.supports_budget
    with pytest.raises(harness.BackendUnavailable, match="no head-budget input"):
        masked(torch.randn(1, 3, 32, 32), None, None, 0.5)
    assert masked._fn is None  # refused before exporting anything


def test_backends_that_need_cuda_are_unavailable_on_the_cpu():
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    cpu = torch.device("cpu")
    for name in ("timm-graph", "triton-graph", "triton"):
        with pytest.raises(harness.BackendUnavailable, match="CUDA"):
            harness.BACKEND_FACTORIES[name](name, model, cpu)
    assert harness.default_backends(cpu) == ["timm", "reference", "compact"]
    assert harness.default_backends(torch.device("cuda")) == ["timm", "reference", "compact", "triton"]
    # (constructing a graph runner captures nothing yet)
    assert harness.GraphRunner("timm-graph", model, torch.device("cuda")).dense
    assert not harness.GraphRunner("triton-graph", model, torch.device("cuda")).dense


def test_onnxruntime_sessions_of_the_bench_do_not_spin():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    runner = harness.OnnxRuntimeRunner("onnxruntime", model, torch.device("cpu"))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert runner(pixels, *harness.steering_vectors(model, 2, "cpu"), None).shape == (2, 2, 3)
    options = runner._fn.session.get_session_options()  # (read back from the session ORT built)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    from headsteer.export.onnx_runner import NO_SPINNING

    assert runner.environment()["onnxruntime"]["session_config"] == NO_SPINNING


@pytest.mark.parametrize("kwargs", [dict(), dict(global_pool="map"), dict(global_pool="map", class_token=False, reg_tokens=2),
                                    dict(in_chans=1)], ids=["token", "map", "map-registers", "one-channel"])
def test_flop_count_matches_torch_flop_counter(kwargs):
    """vit_flops against torch's own count of the matmuls (attention unfused, so that the counter
    sees q k^T and (.)v), including the attention-pool head of global_pool="map"."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", **dict(TINY, **kwargs)).eval()
    counts = vit_flops(vit)
    assert counts.total == _torch_flops(vit, 32)
    assert (counts.pool > 0) == (kwargs.get("global_pool") == "map")


def _torch_flops(vit, img_size):
    """torch's count of `vit`'s matmuls on one image (attention unfused, so that the counter sees
    q k^T and (.)v)."""
    from torch.utils.flop_counter import FlopCounterMode

    for module in vit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        vit(torch.randn(1, vit.patch_embed.proj.in_channels, img_size, img_size))
    return counter.get_total_flops()


def test_flop_count_of_an_attention_pool_with_several_latent_queries():
    import timm
    from timm.layers import AttentionPoolLatent

    vit = timm.create_model("vit_tiny_patch16_224", **dict(TINY, global_pool="map")).eval()
    vit.attn_pool = AttentionPoolLatent(48, num_heads=3, mlp_ratio=2.0, latent_len=3).eval()
    assert vit_flops(vit).total == _torch_flops(vit, 32)


def test_patch_size_of_a_patch_embed_storing_an_int():
    import types

    from headsteer.bench.flops import patch_size

    assert patch_size(types.SimpleNamespace(patch_embed=types.SimpleNamespace(patch_size=16))) == (16, 16)


def test_flop_count_of_an_odd_size_counts_the_padded_patches():
    """With dynamic_img_pad, timm pads 36 px up to 40: 5x5 patches of 8 (not the 4x4 that fit
    unpadded); `img_size` may be given as an int."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", **dict(TINY, dynamic_img_size=True, dynamic_img_pad=True)).eval()
    counts = vit_flops(vit, 36)
    assert counts.tokens == 5 * 5 + 1
    assert counts.total == _torch_flops(vit, 36)


def test_gpu_checks_bench_invocation_is_valid(tmp_path, monkeypatch):
    """bench/gpu_checks.sh's `python -m headsteer.bench` step parses and passes every up-front
    check (CUDA mocked present): a GPU session runs it with no chance to fix it."""
    import re
    import shlex
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"python -m headsteer\.bench (--model.*)$", script, re.MULTILINE)
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(shlex.split(line.replace("$dir", str(tmp_path))))
    config = harness.config_from_args(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert harness.check_config(config).type == "cuda"
    assert set(config.backends) <= set(harness.BACKEND_FACTORIES), config.backends
    assert [option for option, _ in harness._report_files(args)] == ["--json", "--md"]
    assert config.device == "cuda" and config.dtype == "bfloat16" and config.warmup == 2


class _DenseThatFails(harness.Runner):
    """A dense backend besides timm (like timm-graph) that cannot run here."""

    dense = True

    def __call__(self, x, steer_scale, steer_shift, budget):
        raise RuntimeError("capture failed")


def test_a_failing_dense_backend_besides_timm_is_reported_not_fatal():
    """Only timm, the baseline every speed-up divides, must run: another dense backend that fails
    (timm-graph) is reported like any failing cell, and the other backends' rows still come."""
    harness.register_backend("dense-flaky", _DenseThatFails)
    try:
        report = harness.run_bench(_tiny_config(backends=["dense-flaky", "compact"]))
    finally:
        harness.BACKEND_FACTORIES.pop("dense-flaky")
    assert report["environment"]["backends_failed"]["dense-flaky"].endswith("RuntimeError: capture failed")
    assert {r["backend"] for r in report["rows"]} == {"timm", "compact"}


def test_the_benchmarked_gpu_is_the_current_device(monkeypatch):
    """CUDA events record on the current device's stream (as do Triton launches): on --device
    cuda:1 the grid must run with cuda:1 current, or the timer measures an idle cuda:0. (CUDA is
    mocked: the device context is recorded, not entered.)"""
    import contextlib

    current = []

    class FakeDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    monkeypatch.setattr(harness, "_run_grid", lambda config, names, device: list(current))
    assert harness.run_bench(_tiny_config(device="cuda:1")) == [1]
    assert current == []


@pytest.mark.parametrize("sae_blocks", ["none", (-1,)], ids=["no-sae", "sae"])
def test_triton_graph_replays_a_model_with_or_without_saes(monkeypatch, sae_blocks):
    """Without SAEs the steering vectors are None; a CUDA graph replays tensors only, so the graph
    runner must not hand it the Nones. (The graph is replaced by an eager call that checks its
    inputs as CudaGraphForward does; the triton backend runs interpreted.)"""
    from headsteer.runtime import cuda_graph
    from headsteer.runtime.gated_vit import GatedViT

    class EagerGraph(cuda_graph.CudaGraphForward):
        def __call__(self, *inputs, key=None):
            found = [type(t).__name__ for t in inputs]
            assert all(isinstance(t, torch.Tensor) for t in inputs), f"graph inputs must be tensors, got {found}"
            return self.forward(*inputs, key=key)

    monkeypatch.setattr(cuda_graph, "CudaGraphForward", EagerGraph)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks=sae_blocks).eval()
    runner = harness.GraphRunner("triton-graph", model, torch.device("cuda"))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        steer = harness.steering_vectors(model, 2, "cpu")
        assert (steer == (None, None)) == (sae_blocks == "none")
        mask = runner(pixels, *steer, 0.33)
        expected = model(pixels, *steer, budget=0.33, backend="compact").head_mask
    assert torch.equal(mask, expected)


def test_triton_graph_never_captures_inside_a_timed_call(monkeypatch):
    """The graph runner replays one graph per (batch, usage), all of a batch round-robin: with more
    usages than CudaGraphForward keeps by default (16), evicting the oldest graph would capture it
    again (warm-up forwards and a capture) inside a timed call. (CUDA mocked: CudaGraphForward's
    own bookkeeping runs, a capture is counted and runs the forward eagerly, a replay does nothing.)"""
    import contextlib
    import types

    from headsteer.runtime import cuda_graph

    captures = []

    class CountedGraph(cuda_graph.CudaGraphForward):
        @staticmethod
        def _device(inputs):
            return inputs[0].device

        def _capture(self, inputs, key):
            captures.append(key)
            static_inputs = tuple(tensor.clone() for tensor in inputs)
            graph = types.SimpleNamespace(replay=lambda: None)
            event = types.SimpleNamespace(record=lambda stream: None)
            return graph, static_inputs, self.forward(*static_inputs, key=key), event

    monkeypatch.setattr(cuda_graph, "CudaGraphForward", CountedGraph)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(wait_event=lambda event: None))
    harness.register_backend("graph", lambda name, model, device: harness.GraphRunner("triton-graph", model,
                                                                                      torch.device("cuda")))
    usages = tuple(i / 16 for i in range(17))
    try:
        report = harness.run_bench(_tiny_config(backends=["graph"], usages=usages, reps=2))
    finally:
        harness.BACKEND_FACTORIES.pop("graph")
    assert sorted(captures) == sorted(usages)  # each captured once, in its warm-up
    assert len([r for r in report["rows"] if r["backend"] == "triton-graph"]) == 17
