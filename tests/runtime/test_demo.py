"""The demo end to end with a tiny budget: every output is written, report.json has the issue's
keys and fractions in [0, 1]."""
import json

import pytest
import torch

from headsteer.runtime import train as T
from headsteer.runtime.bundle import load_bundle
from headsteer.runtime.demo import DemoSettings, report_markdown, run_demo
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = tiny_settings()
    out = tmp_path_factory.mktemp("demo")
    try:
        report = run_demo(out, settings, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out, report


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_demo(tmp_path, settings, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
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
    (tmp_path / "notes.txt").write_text("the user's")

    def stop(*args, **kwargs):
        assert (tmp_path / "stages" / "backbone").is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_gates", stop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_demo(tmp_path, settings, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert not [path for path in old if path.exists()]
    assert (tmp_path / "notes.txt").read_text() == "the user's"
