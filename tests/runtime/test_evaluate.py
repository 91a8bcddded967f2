"""Evaluation through Engine: per-class table keys and ranges, the eval CLI, the target rule."""
import json

import pytest
import torch

from headsteer.runtime import steering as S
from headsteer.runtime import train as T
from headsteer.runtime.cli import main as cli_main
from headsteer.runtime.data import load_data
from headsteer.runtime.engine import Engine
from headsteer.runtime.evaluate import format_table, meets_target, per_class_table, strategies_summary

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)
PART_KEYS = {"accuracy", "correct", "head_usage", "final_block_usage", "kept_heads", "final_block_head_usage"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = load_data("digits", image_size=8, seed=0)
        model = T.add_gates(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY), seed=0))
        model, _ = T.train_gates(model, splits, T.GateConfig(epochs=1), progress=False)
        model, _ = T.train_sae(model, splits, (-1,), T.SAEConfig(width=32, k=4, epochs=5), progress=False)
        config = S.SteeringConfig(counts=(2, 8), alphas=(0.0, 4.0), betas=(-1.0,), global_alphas=(0.0,),
                                  topk_ks=(2,), topk_alphas=(0.0,))
        table, stage = S.fit_steering(model, splits, config, progress=False)
        path = tmp_path_factory.mktemp("eval") / "bundle"
        T.save_stage(model, path, splits, T._json_safe(T._record({}, stage)), steering=table)
    finally:
        torch.set_num_threads(threads)
    return path, splits, stage


def _check_part(part):
    assert set(part) == PART_KEYS
    for key in ("accuracy", "head_usage", "final_block_usage"):
        assert 0.0 <= part[key] <= 1.0
    assert all(0 <= h < 6 for h in part["kept_heads"])


def test_per_class_table_and_strategies(bundle):
    path, splits, stage = bundle
    engine = Engine.load(path, backend="compact")
    rows = per_class_table(engine, splits.test, "per-class", random_control=True)
    assert [r["class"] for r in rows] == splits.class_names
    assert sum(r["n_test"] for r in rows) == len(splits.test)
    for r in rows:
        assert {"class", "n_test", "latents", "alpha", "unsteered", "steered", "random"} <= set(r)
        _check_part(r["unsteered"])
        _check_part(r["steered"])
        if not r["latents"]:  # identity row: steering changes nothing
            assert r["steered"] == r["unsteered"]
    # the reference backend gives the same table: the compact path is exact
    reference_rows = per_class_table(Engine.load(path, backend="reference"), splits.test, "per-class")
    for a, b in zip(rows, reference_rows):
        assert a["steered"]["correct"] == b["steered"]["correct"]
        assert a["steered"]["final_block_usage"] == pytest.approx(b["steered"]["final_block_usage"])
    summary = strategies_summary(engine, splits.test, stage)
    assert set(summary) == {"none", "global_amplification", "topk_amplification", "per_class", "random_latents"}
    for s in summary.values():
        for key in ("test_accuracy", "head_usage", "final_block_usage"):
            assert 0.0 <= s[key] <= 1.0
    assert "accuracy" in format_table(rows).splitlines()[0] or "acc" in format_table(rows)


def test_steer_toward_one_class(bundle):
    path, splits, _ = bundle
    engine = Engine.load(path, backend="compact")
    rows = per_class_table(engine, splits.test, "3")
    assert all(r["steered_toward"] == "3" for r in rows)
    assert all(r["latents"] == engine.info.steering.info[3]["latents"] for r in rows)


def test_meets_target_rule():
    base = dict(final_block_usage=0.8, correct=30)
    assert meets_target(dict(unsteered=base, steered=dict(final_block_usage=0.48, correct=29)))
    assert not meets_target(dict(unsteered=base, steered=dict(final_block_usage=0.49, correct=30)))
    assert not meets_target(dict(unsteered=base, steered=dict(final_block_usage=0.2, correct=28)))


def test_eval_cli(bundle, tmp_path, capsys):
    path, splits, _ = bundle
    out = tmp_path / "table.json"
    assert cli_main(["eval", str(path), "--data", "digits", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 10
    assert {"class", "n_test", "latents", "alpha", "unsteered", "steered"} <= set(rows[0])
    assert set(rows[0]["steered"]) == PART_KEYS
    assert cli_main(["eval", str(path), "--data", "digits", "--steer", "none", "--split", "val"]) == 0
    assert cli_main(["eval", str(path), "--data", "digits", "--steer", "seven"]) == 2
    assert "unknown steering class" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "nope"), "--data", "digits"]) == 2
