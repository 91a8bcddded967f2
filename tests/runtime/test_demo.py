"""The demo end to end with a tiny budget: every output is written, report.json has the issue's
keys and fractions in [0, 1]."""
import copy
import json
import os
import types

import pytest
import torch

from headsteer.runtime import demo as demo_module
from headsteer.runtime import train as T
from headsteer.runtime.bundle import load_bundle
from headsteer.runtime.cli import build_parser
from headsteer.runtime.demo import DemoSettings, check_out, report_markdown, run_demo
from headsteer.runtime.errors import InputError
from headsteer.runtime.plots import plot_paths
from headsteer.runtime.steering import SteeringConfig

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)
STRATEGY_KEYS = {"test_accuracy", "head_usage", "final_block_usage"}


def tiny_settings() -> DemoSettings:
    return DemoSettings(
        image_size=8,
        timm_kwargs=dict(TINY),
        backbone=T.BackboneConfig(epochs=2),
        gates=T.GateConfig(epochs=1),
        sae=T.SAEConfig(width=32, k=4, epochs=5),
        steering=SteeringConfig(counts=(4,), alphas=(0.0,), betas=(-1.0,), global_alphas=(0.0,), topk_ks=(2,),
                                topk_alphas=(0.0,)),
        latency_repeats=1,
    )


def _run_demo_on_one_thread(out, settings):
    """run_demo with one torch thread (the tiny runs are faster so beside other tests), quietly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(out, settings, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _run_demo_on_one_thread(out, tiny_settings())


def _fractions(part, keys):
    for key in keys:
        assert 0.0 <= part[key] <= 1.0, (key, part[key])


def test_demo_writes_everything(demo):
    out, report = demo
    for name in ("report.json", "report.md", "per_class_usage.png", "kept_heads.png", "per_class_usage_all.png",
                 "kept_heads_all.png", "bundle/headsteer.json", "bundle_all/headsteer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == report
    assert sorted(out.glob("*.png")) == sorted(plot_paths(out, whole_network=True))
    assert not list(out.glob(".*tmp*"))
    md = (out / "report.md").read_text()
    assert "Per-class steering" in md and "whole-network" in md
    # the strategy tables' setting column holds the chosen setting, never a measured number
    assert "| none | - |" in md and "_usage=" not in md and "test_accuracy=" not in md


def test_demo_report_keys_and_ranges(demo):
    _, report = demo
    _fractions(report["baseline"], STRATEGY_KEYS)
    assert 0.0 <= report["dense_backbone"]["test_accuracy"] <= 1.0
    assert set(report["sae"]) >= {"fve", "l0", "dead_fraction"}
    assert report["sae"]["fve"] <= 1.0 and 0.0 <= report["sae"]["dead_fraction"] <= 1.0
    assert set(report["strategies"]) == {"none", "global_amplification", "topk_amplification", "per_class",
                                         "random_latents"}
    for strategy in report["strategies"].values():
        assert STRATEGY_KEYS <= set(strategy)
        _fractions(strategy, STRATEGY_KEYS)
    assert len(report["per_class"]) == 10
    # The whole-split baseline agrees with the per-class rows, aggregated independently here.
    n_test = sum(row["n_test"] for row in report["per_class"])
    correct = sum(row["unsteered"]["correct"] for row in report["per_class"])
    assert abs(correct / n_test - report["baseline"]["test_accuracy"]) < 1e-4  # report values are rounded
    usage = sum(row["unsteered"]["head_usage"] * row["n_test"] for row in report["per_class"]) / n_test
    assert abs(usage - report["baseline"]["head_usage"]) < 1e-3
    for row in report["per_class"]:  # the random control perturbs as many latents as the steering
        assert len(row["random"]["latents"]) == len(row["latents"])
    for row in report["per_class"]:
        assert {"class", "n_test", "latents", "alpha", "unsteered", "steered"} <= set(row)
        for part in ("unsteered", "steered"):
            assert {"accuracy", "head_usage", "final_block_usage", "kept_heads"} <= set(row[part])
            _fractions(row[part], ("accuracy", "head_usage", "final_block_usage"))
    whole = report["whole_network"]
    assert len(whole["per_class"]) == 10 and set(whole["strategies"]) == set(report["strategies"])
    for lat in (report["latency"], whole["latency"]):
        assert lat["backend"] == "compact" and lat["unsteered_ms_per_image"] > 0 and lat["steered_ms_per_image"] > 0


def test_demo_bundles_record_their_split(demo):
    out, _ = demo
    for name in ("stages/backbone", "stages/gates", "bundle", "bundle_all"):
        assert load_bundle(out / name)[1].extra["data"] == {"spec": "digits", "split_seed": 0}, name


def test_demo_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    notes = tmp_path / "bundle" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("precious")
    with pytest.raises(InputError, match="not a headsteer bundle"):
        run_demo(tmp_path, tiny_settings(), progress=False, log=lambda *_: None)
    assert notes.read_text() == "precious" and not (tmp_path / "stages").exists()  # refused before any work
    (tmp_path / "stages").write_text("a file")
    with pytest.raises(InputError, match="not a directory"):
        run_demo(tmp_path / "stages", tiny_settings(), progress=False, log=lambda *_: None)


def test_demo_whole_network_target_is_labelled_by_the_usage_it_counts(demo):
    _, report = demo
    whole = report["whole_network"]
    # Every gated block has an SAE there: a class meets the target when whole-model usage falls by
    # 40% (not the final block's), losing at most one image.
    counted = sum((r["unsteered"]["head_usage"] - r["steered"]["head_usage"]) >= 0.4 * r["unsteered"]["head_usage"]
                  - 1e-9 and r["steered"]["correct"] >= r["unsteered"]["correct"] - 1 for r in whole["per_class"])
    assert whole["classes_meeting_target"]["per_class"] == counted
    md = report_markdown(report)
    assert "Final-block target" not in md
    assert f"whole-model head usage): {counted} of 10 classes" in md
    assert "classes meeting target (steered-block usage)" in md


def test_demo_whole_network_sae_means_say_which_sites_they_cover(demo):
    _, report = demo
    whole = report["whole_network"]
    sites = list(whole["sae"].values())
    varying = [s for s in sites if s["fve"] is not None]
    assert len(varying) < len(sites)  # block 0 sees one vector for every image: no FVE
    # FVE is a mean over the sites that have one; L0 and dead latents over every site
    assert abs(whole["sae_mean"]["l0"] - sum(s["l0"] for s in sites) / len(sites)) < 1e-3
    md = report_markdown(report)
    assert "mean over sites with a varying input): FVE" not in md
    assert f"mean over the {len(varying)} site(s) with a varying input" in md
    assert f"L0 {whole['sae_mean']['l0']:.1f}, dead {100 * whole['sae_mean']['dead_fraction']:.1f}% (means over all " \
           f"{len(sites)} sites)" in md


def test_demo_reports_an_sae_without_fve(tmp_path):
    # One block: the SAE on the last block sees the class token before any attention, one vector for
    # every image, so its FVE is undefined (None). The report says n/a; it used to crash after
    # report.json and the plots were written, leaving no report.md.
    settings = tiny_settings()
    settings.timm_kwargs = dict(TINY, depth=1)
    settings.whole_network, settings.latency_repeats = False, 0
    report = _run_demo_on_one_thread(tmp_path, settings)
    assert report["sae"]["fve"] is None
    assert "FVE n/a" in (tmp_path / "report.md").read_text()


def test_demo_refuses_a_report_path_that_is_a_folder_before_any_work(tmp_path):
    for name in ("report.md", "kept_heads_all.png"):
        out = tmp_path / name.split(".")[0]
        (out / name).mkdir(parents=True)
        with pytest.raises(InputError, match=name):
            run_demo(out, tiny_settings(), progress=False, log=lambda *_: None)
        assert not (out / "stages").exists()  # refused before any training


def test_demo_refuses_a_bad_seed_leaving_nothing_on_disk(tmp_path):
    settings = tiny_settings()
    settings.seed = -1
    with pytest.raises(InputError, match="seed"):
        run_demo(tmp_path / "out", settings, progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_a_rerun_stopped_midway_leaves_no_report_of_the_bundles_it_replaced(tmp_path, monkeypatch):
    """The first replaced bundle makes an earlier run's reports (the whole-network plots of a
    run with whole_network included) describe models that are gone; a rerun stopped before
    writing its own leaves none of them."""
    settings = tiny_settings()
    settings.whole_network = False
    old = [tmp_path / "report.json", tmp_path / "report.md", *plot_paths(tmp_path, whole_network=True)]
    for path in old:
        path.write_text("an earlier run's")
    old[1].unlink()
    old[1].symlink_to(tmp_path / "moved.md")  # a link to a report moved away goes too
    (tmp_path / "notes.txt").write_text("the user's")

    def stop(*args, **kwargs):
        assert (tmp_path / "stages" / "backbone").is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_gates", stop)
    with pytest.raises(KeyboardInterrupt):
        _run_demo_on_one_thread(tmp_path, settings)
    assert not [path for path in old if os.path.lexists(path)]
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def _walk_floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_floats(v)


def test_demo_report_records_its_preset_and_rounds_every_number(demo):
    _, report = demo
    assert report["settings"]["quick"] is False  # tiny_settings keeps the "full" preset
    floats = list(_walk_floats(report))
    assert floats and all(x == round(x, 4) for x in floats)
    assert all(x == round(x, 4) for row in report["per_class"] for x in row["unsteered"]["final_block_head_usage"])


def test_demo_report_names_the_blocks_it_gated_and_steered(demo):
    _, report = demo
    assert report["model"]["gated_blocks"] == [0, 1]
    assert report["sae"]["block"] == [1] and list(report["whole_network"]["sae"]) == ["0", "1"]


def test_demo_setting_report_counts_each_column_and_applies_the_chosen_global_alpha(monkeypatch):
    def part(correct, usage):
        return dict(correct=correct, head_usage=usage, steered_block_usage=usage, final_block_usage=usage)

    # meeting the target: per-class steering in row 0; the random control in rows 1 and 2; the
    # global strategy in rows 0 and 2 (row 1 loses two images)
    rows = [dict(unsteered=part(5, 1.0), steered=part(5, 0.5), random=part(5, 1.0), global_amplification=part(5, 0.5)),
            dict(unsteered=part(5, 1.0), steered=part(5, 1.0), random=part(5, 0.5), global_amplification=part(3, 0.5)),
            dict(unsteered=part(5, 1.0), steered=part(5, 1.0), random=part(5, 0.5), global_amplification=part(5, 0.5))]
    seen = {}

    def per_class_table(engine, dataset, steer, random_control=False, others=None):
        seen.update(others)
        return rows

    monkeypatch.setattr(demo_module, "per_class_table", per_class_table)
    monkeypatch.setattr(demo_module, "strategies_summary", lambda *args: {})
    engine = types.SimpleNamespace(steer_width=4, model=types.SimpleNamespace(sae_blocks=[1]))
    report = demo_module._setting_report(engine, [None] * 3, dict(global_amplification=dict(alpha=0.5)), 0)
    assert report["classes_meeting_target"] == dict(per_class=1, random_latents=2, global_amplification=2, of=3)
    scale, shift = seen["global_amplification"]
    assert scale.shape == (3, 4) and (scale == 0.5).all() and (shift == 0).all()
    assert report["latency"] is None


def test_demo_markdown_shows_each_rows_measured_usage_drop_and_latency(demo):
    report = copy.deepcopy(demo[1])
    # (the tiny demo steers nothing: give a row of each setting usages and kept heads that differ)
    for row, unsteered, steered in ((report["per_class"][0], 0.8, 0.4), (report["whole_network"]["per_class"][0], 0.9, 0.6)):
        row["unsteered"].update(head_usage=unsteered, final_block_usage=unsteered - 0.1)
        row["steered"].update(head_usage=steered, final_block_usage=steered - 0.1, kept_heads=[1, 2])
    md = report_markdown(report)
    last, whole = md.split("## Beyond the paper")
    for section, rows, key in ((last, report["per_class"], "final_block_usage"),
                               (whole, report["whole_network"]["per_class"], "head_usage")):
        for r in rows:
            line = next(line for line in section.splitlines() if line.startswith(f"| {r['class']} | {r['n_test']} |"))
            u, s = r["unsteered"][key], r["steered"][key]
            drop = (u - s) / u if u else 0.0
            assert f"| {u:.3f} -> {s:.3f} | {drop:.0%} | {r['steered']['kept_heads']} |" in line, line
    for lat, section in ((report["latency"], last), (report["whole_network"]["latency"], whole)):
        assert (f"Latency (compact, {lat['threads']} thread(s), median of {lat['repeats']}): unsteered "
                f"{lat['unsteered_ms_per_image']:.3f} ms/image") in section
    side = whole.split("## Side by side")[1].splitlines()
    assert sum(line.startswith(("| last block (paper) |", "| every block |")) for line in side) == 2
    shifted = copy.deepcopy(report)
    shifted["per_class"][0].update(mode="shift", beta=-1.0)
    assert " | shift -1.0x class mean | " in report_markdown(shifted)


def test_demo_refuses_a_bundle_folder_it_would_replace_only_where_it_writes_one(tmp_path):
    settings = tiny_settings()
    for name in ("stages/gates", "bundle_all"):
        out = tmp_path / name.replace("/", "_")
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text("precious")
        with pytest.raises(InputError, match="not a headsteer bundle"):
            check_out(out, settings)
    settings.whole_network = False  # bundle_all is left alone then
    check_out(tmp_path / "bundle_all", settings)


def test_demo_seeds_every_stage_and_records_the_model_it_built(tmp_path):
    """Another seed reaches the split and every stage; the image size and class count come from
    the data when the timm kwargs leave them out, and the report records what was built."""
    settings = tiny_settings()
    settings.seed, settings.whole_network, settings.latency_repeats = 1, False, 0
    settings.timm_kwargs = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
    report = _run_demo_on_one_thread(tmp_path, settings)
    assert report["data"]["split_seed"] == 1
    assert {report["settings"][part]["seed"] for part in ("backbone", "gates", "sae", "steering")} == {1}
    assert report["model"]["timm_kwargs"] == dict(settings.timm_kwargs, img_size=8, num_classes=10)
    for name in ("stages/backbone", "stages/gates", "bundle"):
        assert load_bundle(tmp_path / name)[1].extra["data"] == {"spec": "digits", "split_seed": 1}, name
    assert "whole_network" not in report and not (tmp_path / "bundle_all").exists()


def _demo_args(*argv):
    """`headsteer demo ARGV` as the command line parses it."""
    return build_parser().parse_args(["demo", *argv])


def test_demo_command_passes_its_options_to_the_run(tmp_path, monkeypatch):
    seen = []

    def stop(out, settings, progress=True, log=print):
        seen.append((out, settings, progress))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_demo", stop)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            demo_module.run(_demo_args("--out", str(tmp_path / "a"), "--quick", "--seed", "3", "--no-whole-network",
                                       "--no-progress", "--threads", "1"))
        with pytest.raises(KeyboardInterrupt):
            demo_module.run(_demo_args("--out", str(tmp_path / "b")))
    finally:
        torch.set_num_threads(threads)
    (_, quick, progress), (_, full, _) = seen
    assert (quick.preset, quick.seed, quick.whole_network, progress) == ("quick", 3, False, False)
    assert (full.preset, full.seed, full.whole_network) == ("full", 0, True)
    for budget in (lambda s: s.backbone.epochs, lambda s: s.gates.epochs, lambda s: s.sae.epochs,
                   lambda s: s.latency_repeats):
        assert budget(quick) < budget(full)


def test_demo_command_refuses_no_threads_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "run_demo", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(InputError, match="--threads must be >= 1, got 0"):
        demo_module.run(_demo_args("--out", str(tmp_path / "out"), "--threads", "0"))
    assert not (tmp_path / "out").exists()


def test_demo_report_sae_metrics_are_each_bundles_own(demo):
    out, report = demo

    def recorded(name):
        (stage,) = [s for s in load_bundle(out / name)[1].extra["stages"] if s["recipe"] == "sae"]
        return stage["val"]

    for reported, name in ((report["sae"], "bundle"), (report["whole_network"]["sae_mean"], "bundle_all")):
        for key, value in recorded(name).items():
            assert abs(reported[key] - value) < 1e-4, (name, key)
