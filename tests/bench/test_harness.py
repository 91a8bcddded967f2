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


def test_bundle_source(tmp_path):
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.gated_vit import GatedViT

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY).eval()
    path = save_bundle(model, tmp_path / "bundle")
    config = harness.BenchConfig(bundle=str(path), backends=["compact"], batches=(2,), usages=(0.33,),
                                 reps=1, warmup=1, progress=False)
    report = harness.run_bench(config)
    assert "bundle" in report["environment"]["model"] and "trained" in report["environment"]["weights"]
    assert {r["backend"] for r in report["rows"]} == {"timm", "compact"}
    with pytest.raises(Exception, match="img-size"):
        harness.run_bench(harness.BenchConfig(bundle=str(path), img_sizes=(64,), batches=(1,), reps=1, progress=False))
