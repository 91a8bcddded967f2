"""Evaluation through Engine: per-class table keys and ranges, the eval CLI, the target rule."""
import json

import pytest
import torch

from headsteer.runtime import evaluate as E
from headsteer.runtime import steering as S
from headsteer.runtime import train as T
from headsteer.runtime.bundle import SteeringTable, save_bundle
from headsteer.runtime.cli import main as cli_main
from headsteer.runtime.data import ImageDataset, data_record, load_data
from headsteer.runtime.engine import Engine
from headsteer.runtime.errors import InputError
from headsteer.runtime.evaluate import (format_table, meets_target, per_class_table, run_engine, steered_sites,
                                        strategies_summary,
                                        summarize)
from headsteer.runtime.gated_vit import GatedViT

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)
PART_KEYS = {"accuracy", "correct", "head_usage", "steered_block_usage", "steered_kept_heads", "final_block_usage",
             "kept_heads", "final_block_head_usage"}


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


def _resaved(path, out, steering="same", extra=None):
    """The bundle at `path` saved again at `out` with another steering table and/or `extra`."""
    engine = Engine.load(path, backend="compact")
    table = engine.info.steering if steering == "same" else steering
    save_bundle(engine.model, out, class_names=engine.class_names, steering=table, mean=engine.info.mean,
                std=engine.info.std, extra=engine.info.extra if extra is None else extra)
    return out


def _reordered(table, order):
    """`table` with its rows (and their info) in another order, or only some of them."""
    rows = [table.class_names.index(name) for name in order]
    return SteeringTable(list(order), table.scale[rows], table.shift[rows], [table.info[r] for r in rows])


def _no_data(*args, **kwargs):
    raise AssertionError("eval loaded data before refusing its input")


def _check_part(part):
    assert set(part) == PART_KEYS
    for key in ("accuracy", "head_usage", "steered_block_usage", "final_block_usage"):
        assert 0.0 <= part[key] <= 1.0
    assert all(0 <= h < 6 for h in part["kept_heads"])
    assert set(part["steered_kept_heads"]) == {"1"}  # the SAE sits on the last of two blocks


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
        for key in ("test_accuracy", "head_usage", "steered_block_usage", "final_block_usage"):
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


def test_meets_target_at_exactly_40_percent_and_with_no_usage_to_cut():
    """A fall of exactly 40% meets the target (even where the float division lands just under
    0.4); a class whose unsteered usage is already 0 has nothing to cut and does not."""
    for before, after in ((1.0, 0.6), (0.5, 0.3), (0.7, 0.42)):
        assert meets_target(dict(unsteered=dict(final_block_usage=before, correct=5),
                                 steered=dict(final_block_usage=after, correct=4)))
    assert not meets_target(dict(unsteered=dict(final_block_usage=0.0, correct=5),
                                 steered=dict(final_block_usage=0.0, correct=5)))


def test_format_table_shows_setting_drop_and_kept_heads_per_row():
    """alpha (or a shift row's beta with "m"), "no row" for a class steered by none, the relative fall
    of steered-block usage, and kept heads per steered block when there are several."""
    def part(usage, kept):
        return dict(accuracy=1.0, correct=4, head_usage=usage, steered_block_usage=usage, final_block_usage=1.0,
                    kept_heads=[0], steered_kept_heads=kept, final_block_head_usage=[1.0])

    before, after = part(0.8, {"1": [0, 1, 2], "3": [4]}), part(0.4, {"1": [0, 1], "3": [2]})
    common = dict(n_test=4, steered_blocks=[1, 3], unsteered=before, steered=after)
    rows = [dict(common, **{"class": "cat"}, steering_row="cat", latents=[5, 6], alpha=4.0),
            dict(common, **{"class": "dog"}, steering_row="dog", latents=[7], alpha=1.0, mode="shift", beta=-1.5),
            dict(common, **{"class": "owl"}, steering_row=None, latents=[], alpha=1.0, steered=before)]
    cat, dog, owl = (line.rstrip() for line in format_table(rows).splitlines()[2:5])
    assert cat.split()[:4] == ["cat", "4", "2", "4"] and "50.0%" in cat and cat.endswith("b1:0,1 b3:2")
    assert dog.split()[:4] == ["dog", "4", "1", "-1.5m"]
    assert owl.split()[:5] == ["owl", "4", "0", "no", "row"] and "0.0%" in owl and owl.endswith("b1:0,1,2 b3:4")


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


def test_eval_cli_counts_the_classes_whose_steering_meets_the_target(bundle, tmp_path, capsys, monkeypatch):
    """The summary line counts the classes whose steered part meets the target: here classes 3 and 7,
    whose steered-block usage is made to halve."""
    path, _, _ = bundle

    def halved(*args, **kwargs):
        rows = per_class_table(*args, **kwargs)
        for row in rows:
            usage = row["unsteered"]["steered_block_usage"] / (2 if row["class"] in ("3", "7") else 1)
            row["steered"] = dict(row["unsteered"], steered_block_usage=usage)
        return rows

    monkeypatch.setattr(E, "per_class_table", halved)
    assert cli_main(["eval", str(path), "--data", "digits"]) == 0
    assert "2 of 10 classes: usage at the steered block(s) down >= 40%" in capsys.readouterr().out


def test_eval_splits_with_the_bundles_recorded_seed(bundle, tmp_path, capsys, monkeypatch):
    """eval's default split is the bundle's own (trained with seed 3 here); another --seed is refused
    before any data is loaded, since its test split would hold training images."""
    path, _, _ = bundle
    seeded = _resaved(path, tmp_path / "seed3", extra={"data": data_record("digits", 3)})
    seen = []
    monkeypatch.setattr(E, "load_data", lambda *a, **k: seen.append(k["seed"]) or load_data(*a, **k))
    assert cli_main(["eval", str(seeded), "--data", "digits", "--steer", "none"]) == 0
    assert seen == [3] and "split seed 3 (recorded in the bundle)" in capsys.readouterr().out
    assert cli_main(["eval", str(seeded), "--data", "digits", "--steer", "none", "--seed", "3"]) == 0
    monkeypatch.setattr(E, "load_data", _no_data)
    assert cli_main(["eval", str(seeded), "--data", "digits", "--seed", "0"]) == 2
    assert "trained on the split made with seed 3" in capsys.readouterr().err


def test_eval_without_a_recorded_seed_uses_seed_or_zero_and_says_so(bundle, tmp_path, capsys, monkeypatch):
    path, _, _ = bundle
    unrecorded = _resaved(path, tmp_path / "none", extra={"note": "no stages"})
    seen = []
    monkeypatch.setattr(E, "load_data", lambda *a, **k: seen.append(k["seed"]) or load_data(*a, **k))
    assert cli_main(["eval", str(unrecorded), "--data", "digits", "--steer", "none"]) == 0
    assert "split seed 0 (default 0: the bundle records no split seed" in capsys.readouterr().out
    assert cli_main(["eval", str(unrecorded), "--data", "digits", "--steer", "none", "--seed", "5"]) == 0
    assert "split seed 5 (from --seed" in capsys.readouterr().out
    assert seen == [0, 5]


def test_steering_rows_are_found_by_class_name(bundle, tmp_path):
    """A table whose rows are in another order steers, describes and controls each class exactly like
    the table in class order."""
    path, splits, _ = bundle
    engine = Engine.load(path, backend="compact")
    reverse = _resaved(path, tmp_path / "rev", _reordered(engine.info.steering, engine.class_names[::-1]))
    flipped = Engine.load(reverse, backend="compact")
    for steer in ("per-class", "3"):
        rows = per_class_table(engine, splits.test, steer, random_control=True)
        other = per_class_table(flipped, splits.test, steer, random_control=True)
        assert rows == other
    assert all(r["steered_toward"] == "3" and r["steering_row"] == "3" for r in other)
    assert other[3]["latents"] == engine.info.steering.info[3]["latents"]
    assert strategies_summary(engine, splits.test, {}) == strategies_summary(flipped, splits.test, {})


def test_classes_without_a_steering_row_stay_unsteered(bundle, tmp_path, capsys):
    path, splits, _ = bundle
    engine = Engine.load(path, backend="compact")
    subset = Engine.load(_resaved(path, tmp_path / "sub", _reordered(engine.info.steering, ["7", "3"])),
                         backend="compact")
    full = per_class_table(engine, splits.test, "per-class", random_control=True)
    rows = per_class_table(subset, splits.test, "per-class", random_control=True)
    for row, ref in zip(rows, full):
        if row["class"] in ("3", "7"):
            assert row == ref
        else:
            assert row["steering_row"] is None and row["latents"] == []
            assert row["unsteered"] == ref["unsteered"] and row["steered"] == row["unsteered"]
            assert row["random"] == dict(row["unsteered"], latents=[])
    assert cli_main(["eval", str(tmp_path / "sub"), "--data", "digits"]) == 0
    assert "no steering row (left unsteered): 0, 1, 2, 4, 5, 6, 8, 9" in capsys.readouterr().out


def test_random_control_without_table_info_is_an_input_error(bundle, tmp_path, capsys, monkeypatch):
    path, splits, _ = bundle
    table = Engine.load(path, backend="compact").info.steering
    bare = _resaved(path, tmp_path / "bare", SteeringTable(table.class_names, table.scale, table.shift))
    with pytest.raises(InputError, match="no random-latent control rows"):
        per_class_table(Engine.load(bare, backend="compact"), splits.test, "3", random_control=True)
    monkeypatch.setattr(E, "load_data", _no_data)
    assert cli_main(["eval", str(bare), "--data", "digits", "--random-control"]) == 2
    assert "--random-control" in capsys.readouterr().err


def _sae_block_1_engine(tmp_path, table_info=()):
    """A 3-block model (gates undecided: bias 0) with its SAE on block 1 and identity steering rows."""
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, depth=3), sae_blocks=(1,),
                               sae_width=8, sae_k=2, gate_init_bias=0.0)
    names = [str(i) for i in range(10)]
    table = SteeringTable(names, torch.ones(10, 8), torch.zeros(10, 8), list(table_info))
    return Engine.load(save_bundle(model, tmp_path / "b", class_names=names, steering=table), backend="compact")


def test_random_control_toward_one_class_uses_that_class_row(tmp_path):
    """--steer 3 --random-control: every image gets class 3's random row (only that one moves latents)."""
    info = [dict(alpha=16.0, random_scale_latents=list(range(8)) if c == 3 else [], random_latents=[c])
            for c in range(10)]
    engine = _sae_block_1_engine(tmp_path, info)
    test = load_data("digits", image_size=8).test
    rows = per_class_table(engine, test, "3", random_control=True)
    control = S.random_table(engine.info.steering, engine.steer_width).rows(["3"] * len(test))
    pred, mask = run_engine(engine, test.images, vectors=control)
    _, unsteered = run_engine(engine, test.images)
    assert not torch.equal(mask, unsteered)  # the control row does move the gates
    for c, row in enumerate(rows):
        idx = (test.labels == c).nonzero().squeeze(1)
        assert row["random"] == dict(summarize(pred[idx], mask[idx], test.labels[idx], [(1, 1)]), latents=[3])


def _distinct_rows_engine(tmp_path, info_update=None):
    """The 3-block model of `_sae_block_1_engine` with a different steering row per class (a strong
    shift on one latent each) and a random control row per class (latent c + 3 times 16);
    `info_update` {class index: entries} adds to the rows' recorded info."""
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, depth=3), sae_blocks=(1,),
                               sae_width=8, sae_k=2, gate_init_bias=0.0)
    names = [str(i) for i in range(10)]
    shift = torch.zeros(10, 8)
    for c in range(10):
        shift[c, c % 8] = 4.0 if c % 2 else -4.0
    info = [dict(alpha=16.0, random_scale_latents=[(c + 3) % 8], random_latents=[(c + 3) % 8],
                 **(info_update or {}).get(c, {})) for c in range(10)]
    table = SteeringTable(names, torch.ones(10, 8), shift, info)
    return Engine.load(save_bundle(model, tmp_path / "b", class_names=names, steering=table), backend="compact")


def test_per_class_table_steers_each_class_by_its_own_row(tmp_path):
    """Each class's "steered" part is its own images run with its own row (rows differ here, so an
    image steered by another class's row would show)."""
    engine = _distinct_rows_engine(tmp_path)
    test = load_data("digits", image_size=8).test
    rows = per_class_table(engine, test, "per-class")
    _, by_three = run_engine(engine, test.images, "3")
    _, by_four = run_engine(engine, test.images, "4")
    assert not torch.equal(by_three[:, 1], by_four[:, 1])
    for c, row in enumerate(rows):
        idx = (test.labels == c).nonzero().squeeze(1)
        pred, mask = run_engine(engine, test.images[idx], str(c))
        assert row["steered"] == summarize(pred, mask, test.labels[idx], [(1, 1)])


def test_strategies_summary_runs_each_strategy_with_its_chosen_setting(tmp_path):
    """Each strategy's entry is the whole split run its way: unsteered; every latent times the chosen
    global alpha; each image's top-k latents times the chosen alpha; each image by its own class's
    row; each image by its own class's random control row; and it records the setting it used."""
    engine = _distinct_rows_engine(tmp_path)
    test = load_data("digits", image_size=8).test
    n, width = len(test), engine.steer_width
    choices = {"global_amplification": {"alpha": 0.0}, "topk_amplification": {"k": 1, "alpha": 8.0}}
    summary = strategies_summary(engine, test, choices)
    own = [str(int(y)) for y in test.labels]
    runs = {
        "none": run_engine(engine, test.images),
        "global_amplification": run_engine(engine, test.images, vectors=S.global_rows(n, width, 0.0)),
        "topk_amplification": run_engine(engine, test.images, vectors=S.topk_rows(
            E.engine_latents(engine, test.images), 1, 8.0, engine.model)),
        "per_class": run_engine(engine, test.images, own),
        "random_latents": run_engine(engine, test.images,
                                     vectors=S.random_table(engine.info.steering, width).rows(own)),
    }
    settings = {"global_amplification": dict(alpha=0.0), "topk_amplification": dict(k=1, alpha=8.0)}
    for name, (pred, mask) in runs.items():
        part = summarize(pred, mask, test.labels, [(1, 1)])
        assert summary[name] == dict(test_accuracy=part["accuracy"], head_usage=part["head_usage"],
                                     steered_block_usage=part["steered_block_usage"],
                                     final_block_usage=part["final_block_usage"], **settings.get(name, {})), name
    assert len({(s["head_usage"], s["steered_block_usage"]) for s in summary.values()}) == 5  # five different runs


def test_raw_vectors_steer_like_the_table_row_they_copy(tmp_path):
    """(scale, shift) vectors passed raw (the global, top-k and random strategies) act as a table row
    does, shift included (a random control of a shift row carries one)."""
    engine = _distinct_rows_engine(tmp_path)
    images = load_data("digits", image_size=8).test.images
    table, rows = engine.info.steering, [3] * len(images)
    by_row = run_engine(engine, images, "3", batch_size=100)
    by_vectors = run_engine(engine, images, vectors=(table.scale[rows], table.shift[rows]), batch_size=100)
    assert torch.equal(by_vectors[0], by_row[0]) and torch.equal(by_vectors[1], by_row[1])
    assert not torch.equal(by_row[1], run_engine(engine, images)[1])


def test_per_class_table_describes_a_shift_row_by_its_beta(tmp_path):
    engine = _distinct_rows_engine(tmp_path, {3: dict(mode="shift", beta=-1.5, latents=[3])})
    rows = per_class_table(engine, load_data("digits", image_size=8).test, "per-class")
    assert (rows[3]["mode"], rows[3]["beta"], rows[3]["latents"]) == ("shift", -1.5, [3])
    assert "mode" not in rows[4] and "beta" not in rows[4]


def test_per_class_table_refuses_data_whose_classes_are_in_another_order(tmp_path):
    """Labels index the data's class list: the bundle's classes in another order would file every
    image under another class's row."""
    engine = _distinct_rows_engine(tmp_path)
    test = load_data("digits", image_size=8).test
    shuffled = ImageDataset(test.images, test.labels, test.class_names[::-1])
    with pytest.raises(InputError, match="are not the bundle's"):
        per_class_table(engine, shuffled, "per-class")


def test_measure_latency_reports_per_image_times_and_the_speedup(tmp_path, monkeypatch):
    """Medians per image and speedup = unsteered / steered time, on a clock that an unsteered
    batch advances by 3 s and a steered one by 1 s."""
    engine = _distinct_rows_engine(tmp_path)
    test = load_data("digits", image_size=8).test
    clock = [0.0]

    def predict(x, steer=None):
        clock[0] += 1.0 if steer is not None else 3.0

    monkeypatch.setattr(engine, "predict", predict)
    monkeypatch.setattr(E.time, "perf_counter", lambda: clock[0])
    result = E.measure_latency(engine, test, repeats=3, batch_size=64)
    batches = sum(-(-int((test.labels == c).sum()) // 64) for c in range(10))
    assert result["images"] == len(test) and result["repeats"] == 3 and result["batch_size"] == 64
    assert result["unsteered_ms_per_image"] == pytest.approx(1000 * 3 * batches / len(test))
    assert result["steered_ms_per_image"] == pytest.approx(1000 * batches / len(test))
    assert result["speedup"] == pytest.approx(3.0)


def test_usage_is_reported_at_the_steered_block_not_the_last():
    """SAE on block 1 of 3: steered-block usage and kept heads are block 1's; meets_target judges them."""
    mask = torch.zeros(4, 3, 6, dtype=torch.bool)
    mask[:, 1, :2] = True  # steered block: heads 0, 1
    mask[:, 2] = True  # last block: every head
    part = summarize(torch.zeros(4), mask, torch.zeros(4), [(1, 1)])
    assert part["steered_block_usage"] == pytest.approx(2 / 6) and part["steered_kept_heads"] == {"1": [0, 1]}
    assert part["final_block_usage"] == 1.0 and part["kept_heads"] == list(range(6))
    base = dict(steered_block_usage=0.8, final_block_usage=0.5, correct=10)
    assert meets_target(dict(unsteered=base, steered=dict(steered_block_usage=0.4, final_block_usage=0.5, correct=10)))
    assert not meets_target(dict(unsteered=base, steered=dict(steered_block_usage=0.6, final_block_usage=0.1,
                                                              correct=10)))


def test_summarize_per_head_usage_and_strict_majority_of_kept_heads():
    """Per head, the fraction of images keeping it; a head is "kept" by a strict majority only (half
    the images is no majority); with several steered blocks, usage is the mean over all of them."""
    mask = torch.zeros(4, 3, 5, dtype=torch.bool)
    mask[:3, 2, 0] = True  # head 0 by 3 of 4
    mask[:2, 2, 1] = True  # head 1 by exactly half
    mask[:1, 2, 2] = True  # head 2 by 1 of 4
    mask[:, 0, :] = True  # block 0: every head; block 1: none
    pred, labels = torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0])
    part = summarize(pred, mask, labels, [(0, 0), (1, 1)])
    assert part["accuracy"] == 0.75 and part["correct"] == 3
    assert part["final_block_head_usage"] == [0.75, 0.5, 0.25, 0.0, 0.0]
    assert part["kept_heads"] == [0] and part["final_block_usage"] == pytest.approx(1.5 / 5)
    assert part["steered_block_usage"] == 0.5
    assert part["steered_kept_heads"] == {"0": [0, 1, 2, 3, 4], "1": []}
    assert part["head_usage"] == pytest.approx((20 + 0 + 6) / 60)


def test_summarize_an_ungated_model_uses_every_head():
    """No gated block (head_mask [N, 0, H]): nothing is pruned, usage is 1 and there are no kept-head
    lists to report."""
    part = summarize(torch.tensor([0, 1]), torch.zeros(2, 0, 6, dtype=torch.bool), torch.tensor([0, 0]))
    assert part == dict(accuracy=0.5, correct=1, head_usage=1.0, steered_block_usage=None,
                        steered_kept_heads=None, final_block_usage=1.0, kept_heads=None,
                        final_block_head_usage=None)


def test_steered_sites_map_sae_blocks_to_head_mask_positions(tmp_path):
    """head_mask holds gated blocks only: with gates on blocks 1 and 3 of 4 and the SAE on block 3,
    the steered block is mask position 1, not 3."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, depth=4), gate_blocks=[1, 3],
                               sae_blocks=(3,), sae_width=8, sae_k=2)
    engine = Engine.load(save_bundle(model, tmp_path / "b"), backend="compact")
    assert steered_sites(engine) == [(3, 1)]
    mask = torch.zeros(2, 2, 6, dtype=torch.bool)
    mask[:, 1, :3] = True
    part = summarize(torch.zeros(2), mask, torch.zeros(2), steered_sites(engine))
    assert part["steered_block_usage"] == 0.5 and part["steered_kept_heads"] == {"3": [0, 1, 2]}


def test_per_class_table_reports_the_sae_block(tmp_path):
    engine = _sae_block_1_engine(tmp_path)
    test = load_data("digits", image_size=8).test
    rows = per_class_table(engine, test, "per-class")
    _, mask = run_engine(engine, test.images)
    assert mask[:, 1].float().mean() != mask[:, 2].float().mean()
    for c, row in enumerate(rows):
        block = mask[test.labels == c][:, 1].float()
        assert row["steered_blocks"] == [1]
        assert row["unsteered"]["steered_block_usage"] == pytest.approx(float(block.mean()))
    assert "steered (SAE) block(s) [1]" in format_table(rows)


def test_eval_json_folder_is_refused_before_any_work(bundle, tmp_path, capsys, monkeypatch):
    path, _, _ = bundle
    monkeypatch.setattr(E, "load_data", _no_data)
    assert cli_main(["eval", str(path), "--data", "digits", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_eval_json_in_a_missing_folder_and_an_unknown_steer_class_are_refused_before_any_work(
        bundle, tmp_path, capsys, monkeypatch):
    path, _, _ = bundle
    monkeypatch.setattr(E, "load_data", _no_data)
    assert cli_main(["eval", str(path), "--data", "digits", "--json", str(tmp_path / "nowhere" / "t.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(path), "--data", "digits", "--steer", "seven"]) == 2
    assert "unknown steering class" in capsys.readouterr().err


def _no_run(*args, **kwargs):
    raise AssertionError("the evaluation ran the engine before refusing its input")


def test_strategies_summary_without_steering_rows_is_refused_before_any_work(bundle, tmp_path, monkeypatch):
    """per_class and random_latents need the table and its recorded control rows: a bundle without a
    table (or a table without info) is a clear error before the first engine pass, not an
    AttributeError after four of them."""
    path, splits, stage = bundle
    table = Engine.load(path, backend="compact").info.steering
    bare = Engine.load(_resaved(path, tmp_path / "bare", SteeringTable(table.class_names, table.scale, table.shift)),
                       backend="compact")
    untabled = Engine.load(_resaved(path, tmp_path / "none", None), backend="compact")
    monkeypatch.setattr(E, "run_engine", _no_run)
    with pytest.raises(InputError, match="no steering table"):
        strategies_summary(untabled, splits.test, stage)
    with pytest.raises(InputError, match="no random-latent control rows"):
        strategies_summary(bare, splits.test, stage)


def test_engine_latents_follow_the_engines_dtype(bundle):
    """A bfloat16 engine's model takes bfloat16 pixels: the top-k strategy's latents are read in the
    engine's own dtype (as Engine.predict feeds it), not refused as float32 input."""
    path, splits, stage = bundle
    engine = Engine.load(path, backend="compact", dtype="bfloat16")
    images = splits.test.images[:20]
    z = E.engine_latents(engine, images)
    expected = engine.model(engine.normalize(images).to(torch.bfloat16), backend="compact", return_latents=True)
    assert z.shape == (20, engine.steer_width)
    assert torch.equal(z, torch.cat([expected.latents[b] for b in engine.model.sae_blocks], dim=1))
    summary = strategies_summary(engine, splits.test, stage)
    assert 0.0 <= summary["topk_amplification"]["head_usage"] <= 1.0


def test_engine_latents_of_an_exported_engine_come_from_its_bundle_model(bundle, tmp_path):
    """onnxruntime runs the exported file; the latents top-k needs come from the bundle's torch
    model (reference backend), not from a torch forward asked for backend 'onnxruntime'."""
    pytest.importorskip("onnxruntime")
    from headsteer.export import to_onnx

    path, splits, stage = bundle
    onnx_path = to_onnx(path, tmp_path / "model.onnx", attention="masked")
    engine = Engine.load(path, backend="onnxruntime", onnx_path=onnx_path)
    reference = Engine.load(path, backend="reference")
    images = splits.test.images[:20]
    torch.testing.assert_close(E.engine_latents(engine, images), E.engine_latents(reference, images))
    assert set(strategies_summary(engine, splits.test, stage)) >= {"topk_amplification"}


def test_an_empty_split_is_refused_with_a_clear_error(bundle):
    """No images: nothing to measure; a clear InputError, not torch.cat's 'expected a non-empty list'
    (or a latency of 0 ms per image)."""
    path, splits, stage = bundle
    engine = Engine.load(path, backend="compact")
    empty = ImageDataset(splits.test.images[:0], splits.test.labels[:0], splits.class_names)
    with pytest.raises(InputError, match="no images"):
        per_class_table(engine, empty, "per-class")
    with pytest.raises(InputError, match="no images"):
        strategies_summary(engine, empty, stage)
    with pytest.raises(InputError, match="no images"):
        E.measure_latency(engine, empty, repeats=1)
    with pytest.raises(InputError, match="no images"):
        run_engine(engine, splits.test.images[:0])


def test_raw_vectors_must_be_one_row_per_image(bundle, monkeypatch):
    """Vectors with more rows than images were sliced batch by batch and their extra rows silently
    dropped; too few failed only at the last batch, after the other runs. Both are refused up front."""
    path, splits, _ = bundle
    engine = Engine.load(path, backend="compact")
    n, width = len(splits.test), engine.steer_width
    with pytest.raises(InputError, match="one row per image"):
        run_engine(engine, splits.test.images, vectors=S.global_rows(n + 50, width, 0.0), batch_size=50)
    with pytest.raises(InputError, match="one target per image"):
        run_engine(engine, splits.test.images, steer=["3"] * (n + 50), batch_size=50)
    monkeypatch.setattr(E, "run_engine", _no_run)
    integers = tuple(vector.long() for vector in S.global_rows(n, width, 0.0))
    for rows in (S.global_rows(n + 50, width, 0.0), S.global_rows(n - 50, width, 0.0),
                 S.global_rows(n, width + 1, 0.0), integers):
        with pytest.raises(InputError, match="global_amplification"):
            per_class_table(engine, splits.test, "per-class", batch_size=50, others=dict(global_amplification=rows))


def test_random_control_without_steering_is_refused(bundle):
    """steer=None has no rows to control for; random_control with it was an AttributeError (no table)
    or ran per-class random rows while reporting no latents."""
    path, splits, _ = bundle
    engine = Engine.load(path, backend="compact")
    with pytest.raises(InputError, match="random_control"):
        per_class_table(engine, splits.test, None, random_control=True)


def test_eval_takes_a_non_square_bundle(tmp_path, capsys):
    """A bundle of 8 x 12 images is evaluated on 8 x 12 images (the data used to be made square)."""
    splits = load_data("digits", image_size=(8, 12), seed=0)
    model = T.add_gates(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, img_size=(8, 12)), seed=0))
    path = T.save_stage(model, tmp_path / "wide", splits, {"data": data_record("digits", 0)})
    assert cli_main(["eval", str(path), "--data", "digits", "--steer", "none"]) == 0
    assert "digits test split (360 images)" in capsys.readouterr().out


def test_eval_steer_per_class_without_a_steering_table_is_refused(bundle, tmp_path, capsys, monkeypatch):
    """--steer per-class on a bundle without a steering table is refused before any data is loaded, as
    --steer CLASS is (it used to run unsteered, reporting every class with 0 latents and alpha 1); the
    default --steer steers per class only when the bundle has a table, so a stage bundle still evaluates."""
    path, _, _ = bundle
    plain = _resaved(path, tmp_path / "plain", steering=None)
    monkeypatch.setattr(E, "load_data", _no_data)
    for steer in ("per-class", "3"):
        assert cli_main(["eval", str(plain), "--data", "digits", "--steer", steer]) == 2
        err = capsys.readouterr().err
        assert "no steering table" in err and "--steer none" in err, err
    monkeypatch.setattr(E, "load_data", load_data)
    assert cli_main(["eval", str(plain), "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "classes: usage at the steered" not in out  # ran unsteered: no steering summary


def test_eval_random_control_without_steering_is_refused(bundle, tmp_path, capsys, monkeypatch):
    """--random-control compares steering rows with random ones: with --steer none, or by default on
    a bundle without a steering table, it was silently dropped (the table had no control rows and
    said nothing). Refused before any data loads."""
    path, _, _ = bundle
    plain = _resaved(path, tmp_path / "plain", steering=None)
    monkeypatch.setattr(E, "load_data", _no_data)
    for bundle_path, options in ((path, ["--steer", "none"]), (plain, [])):
        assert cli_main(["eval", str(bundle_path), "--data", "digits", "--random-control", *options]) == 2
        err = capsys.readouterr().err
        assert "--random-control" in err and "needs steering" in err, err


def test_eval_help_lists_every_backend_it_accepts(capsys):
    """`eval --help` listed reference, compact, triton; eval runs any backend Engine.load takes."""
    from headsteer.runtime.engine import EXTERNAL_BACKENDS, TORCH_BACKENDS

    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in ("auto", *TORCH_BACKENDS, *EXTERNAL_BACKENDS):
        assert name in shown.split("--backend BACKEND")[-1].split("--device")[0], (name, shown)
