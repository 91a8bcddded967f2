"""Steering strategies build the vectors they claim, and per-class choices use train statistics
and validation choices only."""
import json
from dataclasses import asdict

import pytest
import torch

from headsteer.runtime import steering as S
from headsteer.runtime import train as T
from headsteer.runtime.bundle import SteeringTable
from headsteer.runtime.data import ImageDataset, Splits, load_data
from headsteer.runtime.errors import InputError
from headsteer.runtime.gated_vit import GatedViT
from headsteer.kernels import reference

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _apply(z, scale, shift):
    return z * scale + shift


def test_global_amplification_multiplies_exactly_the_active_latents():
    z = torch.tensor([[0.0, 2.0, 0.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    scale, shift = S.global_rows(2, 4, 3.0)
    steered = _apply(z, scale, shift)
    assert torch.equal(steered != 0, z != 0)
    assert torch.equal(steered, torch.where(z != 0, 3.0 * z, torch.zeros_like(z)))


def test_topk_amplification_picks_each_samples_most_active_latents():
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks="all", sae_width=5, sae_k=2)
    assert model.sae_offsets == [0, 5]
    z = torch.tensor([
        [0.0, 4.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # site 1 all zero: nothing to amplify there
        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 7.0, 1.0],
    ])
    scale, shift = S.topk_rows(z, 2, 10.0, model)
    assert torch.equal(shift, torch.zeros_like(z))
    expected = torch.ones_like(z)
    expected[0, [1, 3]] = 10.0
    expected[1, [0]] = 10.0  # only one active latent in site 0 of sample 1
    expected[1, [8, 6]] = 10.0
    assert torch.equal(scale, expected)


def test_make_row_and_random_row():
    magnitudes = torch.arange(10, dtype=torch.float32)
    scale, shift = S.make_row(10, [2, 5], "scale", 4.0)
    assert scale.tolist() == [1, 1, 4, 1, 1, 4, 1, 1, 1, 1] and not shift.any()
    scale, shift = S.make_row(10, [2, 5], "shift", -1.0, magnitudes)
    assert not (scale != 1).any() and shift.tolist() == [0, 0, -2, 0, 0, -5, 0, 0, 0, 0]
    generator = torch.Generator().manual_seed(0)
    (rscale, rshift), picked = S.random_row(10, [2, 5], "shift", -1.0, magnitudes, [list(range(10))], [[2, 5]],
                                            generator, [range(10)])
    assert len(picked) == 2 and not set(picked) & {2, 5}
    assert sorted(rshift[picked].tolist()) == [-5.0, -2.0]  # the chosen latents' magnitudes, moved
    assert int((rshift != 0).sum()) == 2


def test_random_control_tops_up_a_short_pool_to_the_same_count():
    generator = torch.Generator().manual_seed(1)
    chosen = [0, 1, 2, 3]
    pool = [[0, 1, 2, 3, 7]]  # only one active latent left besides the chosen ones
    (scale, _), picked = S.random_row(12, chosen, "scale", 0.0, torch.zeros(12), pool, [chosen], generator, [range(12)])
    assert len(picked) == len(chosen) and len(set(picked)) == len(picked)
    assert 7 in picked and not set(picked) & set(chosen)
    assert sorted((scale == 0).nonzero().squeeze(1).tolist()) == sorted(picked)


def test_class_specificity_and_ranking():
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_width=4, sae_k=2)
    labels = torch.tensor([0, 0, 1, 1])
    z = torch.tensor([[2.0, 0, 1, 0], [2.0, 0, 0, 0], [0, 3.0, 1, 0], [0, 1.0, 0, 0.5]])
    scores = S.class_specificity(z, labels, 2)
    torch.testing.assert_close(scores[0], torch.tensor([2.0, -2.0, 0.0, -0.25]))
    ranked = S.ranked_latents(scores, model)
    assert ranked[0] == [[0]] and ranked[1] == [[1, 3]]


class _Untouchable:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"fit_steering looked at the test split ({name})")

    def __len__(self):
        raise AssertionError("fit_steering looked at the test split")


def test_fit_steering_uses_train_statistics_and_val_choices_only():
    torch.manual_seed(0)
    data = load_data("digits", image_size=8, seed=0)
    model = T.add_gates(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY), seed=0))
    model, _ = T.train_sae(model, data, (-1,), T.SAEConfig(width=32, k=4, epochs=10), progress=False)
    splits = Splits(data.train, data.val, _Untouchable(), data.mean, data.std)
    config = S.SteeringConfig(counts=(1, 4), alphas=(0.0, 4.0), betas=(-1.0,), global_alphas=(0.0, 4.0),
                              topk_ks=(2,), topk_alphas=(0.0,))
    table, stage = S.fit_steering(model, splits, config, progress=False)
    assert table.scale.shape == (10, 32) and len(table.info) == 10

    z_train = S.collect_latents(model, data.train.images, data.mean, data.std)
    ranked = S.ranked_latents(S.class_specificity(z_train, data.train.labels, 10), model)
    x_val = T.normalize(data.val.images, data.mean, data.std)
    for c, row in enumerate(table.info):
        # the chosen latents are a prefix of the train ranking
        assert row["latents"] == ranked[c][0][: len(row["latents"])]
        assert len(row["latents"]) in (0, 1, 4) and len(row["random_latents"]) == len(row["latents"])
        assert not set(row["random_latents"]) & set(row["latents"])
        # its recorded val numbers are reproduced on val, and respect the one-image rule
        idx = (data.val.labels == c).nonzero().squeeze(1)
        result = S.measure(model, x_val[idx], data.val.labels[idx], table.scale[c].expand(len(idx), -1),
                           table.shift[c].expand(len(idx), -1))
        assert result["correct"] == row["val_correct_steered"]
        assert row["val_correct_steered"] >= row["val_correct_unsteered"] - 1
        assert row["val_usage_steered"] <= row["val_usage_unsteered"]
        if row["latents"]:
            assert row["val_usage_steered"] < row["val_usage_unsteered"]
            if row["mode"] == "scale":
                assert torch.all(table.scale[c, row["latents"]] == row["alpha"])
    assert stage["global_amplification"]["alpha"] in (1.0, 0.0, 4.0)
    assert stage["topk_amplification"]["k"] == 2
    # the control table rebuilds exactly the random rows
    rand = S.random_table(table, model.steer_width)
    for c, row in enumerate(table.info):
        changed = ((rand.scale[c] != 1) | (rand.shift[c] != 0)).nonzero().squeeze(1).tolist()
        assert set(changed) <= set(row["random_latents"])


def test_steering_is_identity_when_unsteered():
    """Identity rows leave the gate input exactly e (preserve-error), so steering starts neutral."""
    e = torch.randn(3, 8)
    z = torch.relu(torch.randn(3, 5))
    dec = torch.randn(5, 8)
    scale, shift = S.identity_row(5)
    g = reference.steer_gate_input(e, z, dec, torch.zeros(8), scale.expand(3, -1), shift.expand(3, -1))
    torch.testing.assert_close(g, e)


def test_a_class_without_val_images_gets_the_identity_row_and_says_why():
    torch.manual_seed(0)
    names = ["a", "b", "c"]

    def dataset(labels):
        return ImageDataset(torch.rand(len(labels), 3, 8, 8), torch.tensor(labels), names)

    splits = Splits(dataset([0, 1, 2] * 10), dataset([0, 1, 0, 1]), dataset([0, 1, 2]), (0.5,) * 3, (0.25,) * 3)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(1.0,), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    table, _ = S.fit_steering(model, splits, config, progress=False)
    assert torch.equal(table.scale[2], torch.ones(16)) and torch.equal(table.shift[2], torch.zeros(16))
    assert table.info[2]["val_n"] == 0 and table.info[2]["latents"] == []
    assert table.info[2]["val_usage_unsteered"] == 0.0  # (no images: zero usage)
    assert "no validation images" in table.info[2]["note"]
    assert all("note" not in row for row in table.info[:2])


def test_random_table_follows_row_names_and_needs_info():
    info = [dict(alpha=0.0, random_scale_latents=[1]), dict(alpha=4.0, random_scale_latents=[2], random_shift={"0": -1.5})]
    table = SteeringTable(["b", "a"], torch.ones(2, 3), torch.zeros(2, 3), info)
    rand = S.random_table(table, 3)
    assert rand.class_names == ["b", "a"]
    assert rand.rows(["a"])[1].tolist() == [[-1.5, 0.0, 0.0]]  # (JSON object keys are strings)
    assert rand.rows(["a"])[0].tolist() == [[1.0, 1.0, 4.0]] and rand.rows(["b"])[0].tolist() == [[1.0, 0.0, 1.0]]
    with pytest.raises(InputError, match="no random-latent control rows"):
        S.random_table(SteeringTable(["b", "a"], torch.ones(2, 3), torch.zeros(2, 3)), 3)
    assert S.row_info(table, "a") is info[1] and S.row_info(table, "zebra") == {}


def _three_class_splits():
    names = ["a", "b", "c"]

    def dataset(labels):
        return ImageDataset(torch.rand(len(labels), 3, 8, 8), torch.tensor(labels), names)

    return Splits(dataset([0, 1, 2] * 10), dataset([0, 1, 2] * 2), dataset([0, 1, 2]), (0.5,) * 3, (0.25,) * 3)


def test_ties_go_to_the_earlier_setting_in_the_grid_across_modes(monkeypatch):
    """Equal usage falls and latent counts: the grid runs scale (alphas) before shift (betas), so a
    tying alpha beats a tying beta even when the beta sits earlier in its own list."""
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)

    def fake_measure(model, x, labels, scale, shift, batch_size=512):
        n = len(x)
        usage, correct = 1.0, n
        if scale is not None and bool((scale == 0.0).any()):
            correct = n - 5  # alpha 0: loses too many images, refused
        elif scale is not None and (bool((scale != 1.0).any()) or bool((shift != 0.0).any())):
            usage = 0.5  # alpha 4 and beta -1 lower usage alike
        block_usage = torch.full((len(model.gate_blocks),), usage)
        mask = torch.full((n, len(model.gate_blocks), model.num_heads), usage)
        return dict(correct=correct, n=n, usage=usage, block_usage=block_usage, mask=mask)

    monkeypatch.setattr(S, "measure", fake_measure)
    config = S.SteeringConfig(counts=(1,), alphas=(0.0, 4.0), betas=(-1.0,), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    table, _ = S.fit_steering(model, _three_class_splits(), config, progress=False)
    steered = [row for row in table.info if row["latents"]]
    assert steered
    for row in steered:
        assert (row["mode"], row["alpha"], row["beta"]) == ("scale", 4.0, None)


@pytest.mark.parametrize("entry, problem", [
    (dict(alpha=0.0, random_scale_latents=[3]), "latent 3"),
    (dict(alpha=0.0, random_scale_latents=[-1]), "latent -1"),
    (dict(alpha=0.0, random_scale_latents=[1.5]), "latent 1.5"),
    (dict(alpha=float("nan"), random_scale_latents=[1]), "alpha"),
    (dict(random_shift={"7": 1.0}), "latent 7"),
    (dict(random_shift={"-2": 1.0}), "latent -2"),
    (dict(random_shift={"1": float("inf")}), "shift"),
    (dict(alpha=0.0, random_scale_latents=[True]), "latent True"),  # a bool is no index
    (dict(alpha=True, random_scale_latents=[1]), "alpha"),
])
def test_random_table_refuses_info_outside_the_steering_width(entry, problem):
    """The control rows are rebuilt from the table's recorded info (JSON on disk): a latent outside
    [0, width) or a non-finite value is a clear error, never an IndexError or a wrapped index."""
    table = SteeringTable(["a", "b"], torch.ones(2, 3), torch.zeros(2, 3), [dict(alpha=1.0), entry])
    with pytest.raises(InputError, match=problem) as error:
        S.random_table(table, 3)
    assert "'b'" in str(error.value)


def test_make_row_refuses_latents_outside_the_width():
    for latents in ([4], [-1]):
        with pytest.raises(InputError, match="latent"):
            S.make_row(4, latents, "scale", 2.0)


@pytest.mark.parametrize("field, value, problem", [
    ("counts", (1, -1), "counts"),  # site[:-1] would silently take all latents but the last
    ("counts", (0,), "counts"),
    ("alphas", (0.0, float("nan")), "alphas"),
    ("betas", (float("inf"),), "betas"),
    ("global_alphas", (float("nan"),), "global_alphas"),
    ("topk_ks", (), "topk_ks"),
    ("topk_ks", (2, -1), "topk_ks"),
    ("topk_alphas", (float("-inf"),), "topk_alphas"),
    ("max_val_loss", -1, "max_val_loss"),
    ("batch_size", 0, "batch_size"),
    ("counts", (True,), "counts"),  # a bool is no count
    ("alphas", (False,), "alphas"),
    ("seed", -1, "seed"),
])
def test_steering_config_refuses_settings_it_cannot_search(field, value, problem):
    """A NaN alpha would blank the gate input (no head kept: a 'usage fall' the search would pick)
    and a negative count slices the ranking from its end; both are refused when the config is made."""
    with pytest.raises(InputError, match=problem):
        S.SteeringConfig(**{field: value})


def test_fit_steering_leaves_the_model_in_the_mode_it_was_in(monkeypatch):
    """fit_steering runs the model in eval mode (the inference gate) and hands it back training if
    it was training, also when the search raises."""
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(1.0,), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    modes = []
    real_measure = S.measure
    monkeypatch.setattr(S, "measure", lambda model, *args, **kwargs: modes.append(model.training) or
                        real_measure(model, *args, **kwargs))
    model.train()
    S.fit_steering(model, _three_class_splits(), config, progress=False)
    assert model.training and modes and not any(modes)

    def failing_measure(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(S, "measure", failing_measure)
    with pytest.raises(RuntimeError, match="out of memory"):
        S.fit_steering(model, _three_class_splits(), config, progress=False)
    assert model.training


def test_steering_config_takes_numpy_numbers_as_python_ones():
    import numpy as np

    config = S.SteeringConfig(counts=tuple(np.arange(1, 3)), alphas=(np.float32(0.5), 2), topk_ks=(np.int64(4),),
                              batch_size=np.int32(64), seed=np.int64(3))
    assert config.counts == (1, 2) and config.alphas == (0.5, 2.0) and config.topk_ks == (4,) and config.batch_size == 64
    assert type(config.seed) is int and json.dumps(asdict(config))  # (the stage record is JSON)
    assert all(type(v) is int for v in config.counts) and all(type(v) is float for v in config.alphas)


def _crafted_latent_fit(monkeypatch, config, usage_of, unsteered_usage=1.0, seed=None):
    """fit_steering on _three_class_splits with crafted train latents (class c: latent 4c at 3.0,
    4c+1 at 1.0, 4c+2 at 0.5 on half its images; latent 15 at 1.0 everywhere) and a fake measure:
    `usage_of(scale, shift)` -> (usage, images lost) per candidate row, `unsteered_usage` without one."""
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    labels = torch.tensor([0, 1, 2] * 10)
    z = torch.zeros(30, 16)
    for c in range(3):
        rows = (labels == c).nonzero().squeeze(1)
        z[rows, 4 * c], z[rows, 4 * c + 1], z[rows[::2], 4 * c + 2] = 3.0, 1.0, 0.5
    z[:, 15] = 1.0
    monkeypatch.setattr(S, "collect_latents", lambda *args, **kwargs: z.clone())

    def fake_measure(model, x, labels, scale, shift, batch_size=512):
        n = len(x)
        usage, lost = (unsteered_usage, 0) if scale is None else usage_of(scale[0], shift[0])
        block_usage = torch.full((len(model.gate_blocks),), usage)
        return dict(correct=n - lost, n=n, usage=usage, block_usage=block_usage,
                    mask=torch.full((n, len(model.gate_blocks), model.num_heads), usage))

    monkeypatch.setattr(S, "measure", fake_measure)
    table, stage = S.fit_steering(model, _three_class_splits(), config, progress=False, seed=seed)
    return model, z, labels, table, stage


def test_shift_rows_use_the_class_train_mean_and_controls_draw_from_the_class_active_latents(monkeypatch):
    """Shift mode moves latent j by beta x its mean activation on class c in train (not on all of
    train); the random control draws among latents active on class c in train, not chosen."""
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(-1.0,), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    model, z, labels, table, _ = _crafted_latent_fit(
        monkeypatch, config, lambda scale, shift: (0.5, 0) if bool((shift != 0).any()) else (1.0, 0))
    for c, row in enumerate(table.info):
        assert (row["mode"], row["beta"], row["alpha"], row["latents"]) == ("shift", -1.0, 1.0, [4 * c])
        assert row["latents_by_block"] == {"1": [4 * c]}
        class_mean = z[labels == c].mean(0)
        assert table.shift[c].tolist() == (-1.0 * class_mean * (torch.arange(16) == 4 * c)).tolist()
        assert len(row["random_latents"]) == 1
        assert set(row["random_latents"]) <= {4 * c + 1, 4 * c + 2, 15}  # active on c in train, not chosen
        assert list(row["random_shift"].values()) == [-3.0] and row["random_scale_latents"] == []


def test_usage_ties_go_to_fewer_latents_before_the_earlier_setting(monkeypatch):
    """Equal usage falls: fewer latents wins, even when the larger count comes first in the grid."""
    config = S.SteeringConfig(counts=(2, 1), alphas=(0.0,), betas=(), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    _, _, _, table, _ = _crafted_latent_fit(monkeypatch, config, lambda scale, shift: (0.5, 0))
    for c, row in enumerate(table.info):
        assert row["latents"] == [4 * c] and row["alpha"] == 0.0


def test_a_class_may_lose_exactly_max_val_loss_images_and_no_more(monkeypatch):
    """alpha 0 halves usage again but loses 2 val images of the class (max_val_loss=1): refused;
    alpha 0.5 loses exactly 1: allowed, and chosen."""
    config = S.SteeringConfig(counts=(1,), alphas=(0.0, 0.5), betas=(), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,), max_val_loss=1)

    def usage_of(scale, shift):
        return (0.25, 2) if bool((scale == 0.0).any()) else (0.5, 1)

    _, _, _, table, _ = _crafted_latent_fit(monkeypatch, config, usage_of)
    for row in table.info:
        assert row["alpha"] == 0.5 and row["val_correct_steered"] == row["val_correct_unsteered"] - 1


def test_steered_usage_is_the_sae_blocks_own_usage_or_the_whole_models():
    """The objective's usage: the SAE blocks' own (by their place among the gated blocks) when only
    some gated blocks have an SAE; the whole model's when every gated block has one."""
    kwargs = dict(TINY, depth=3)
    partial = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=kwargs, gate_blocks="1:", sae_blocks=[2],
                                 sae_width=8, sae_k=2)
    result = dict(usage=0.6, block_usage=torch.tensor([0.9, 0.3]))
    assert S.steered_usage(result, partial) == pytest.approx(0.3)
    every = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=kwargs, gate_blocks="1:", sae_blocks="1:",
                               sae_width=8, sae_k=2)
    assert S.steered_usage(result, every) == pytest.approx(0.6)


def test_global_amplification_keeps_identity_unless_a_setting_lowers_usage_within_the_allowance(monkeypatch):
    """Global alpha over all val images: identity (alpha 1) unless a setting lowers usage while losing at
    most max_val_loss images per class (3 classes: 3 images in all)."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    effects = {0.0: (0.25, 3), 4.0: (0.1, 4), 2.0: (0.75, 0), 0.5: (0.25, 1)}  # alpha -> (usage, images lost)

    def fake_measure(model, x, labels, scale, shift, batch_size=512):
        n = len(x)
        usage, lost = (0.5, 0) if scale is None else effects[float(scale[0, 0])]
        return dict(correct=n - lost, n=n, usage=usage, block_usage=torch.full((len(model.gate_blocks),), usage),
                    mask=None)

    monkeypatch.setattr(S, "measure", fake_measure)
    x_val, y_val = torch.zeros(6, 3, 8, 8), torch.tensor([0, 1, 2] * 2)
    choose = lambda alphas: S._choose_global(model, x_val, y_val, 3, S.SteeringConfig(global_alphas=alphas))
    assert choose((0.0, 4.0))["alpha"] == 0.0  # 3 lost: within 1 per class; 4 lost: refused
    assert choose((0.0, 4.0)) == dict(alpha=0.0, val_usage=0.25, val_correct=3, val_usage_unsteered=0.5,
                                      val_correct_unsteered=6)
    assert choose((0.5, 0.0))["alpha"] == 0.5 and choose((0.0, 0.5))["alpha"] == 0.0  # ties: the earlier
    assert choose((2.0,))["alpha"] == 1.0  # a rise in usage never beats identity
    assert choose((4.0,))["alpha"] == 1.0


def test_ranked_latents_of_a_later_site_are_indices_into_the_whole_steering_vector():
    """Per site, positive-specificity latents, most specific first, as indices into [S_total] (the
    second site's latents start at its offset)."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks="all", sae_width=4, sae_k=2)
    assert model.sae_offsets == [0, 4]
    scores = torch.tensor([[0.0, 1.0, -2.0, 0.0, 0.5, 0.0, 2.0, -1.0]])
    assert S.ranked_latents(scores, model) == [[[1], [6, 4]]]


def test_make_row_refuses_an_unknown_mode_and_a_shift_without_magnitudes():
    with pytest.raises(InputError, match="'scale' or 'shift'"):
        S.make_row(4, [1], "add", 2.0)
    with pytest.raises(InputError, match="magnitudes"):
        S.make_row(4, [1], "shift", 2.0)


def test_topk_with_k_past_the_site_width_amplifies_every_active_latent():
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_width=4, sae_k=2)
    z = torch.tensor([[1.0, 0.5, 2.0, 3.0], [1.0, 0.0, 2.0, 3.0]])
    scale, _ = S.topk_rows(z, 10, 0.0, model)
    assert scale.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_random_control_never_draws_a_latent_twice_when_topping_up():
    """The pool's one free latent (3) is drawn first; the top-up comes from the rest of the site."""
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        _, picked = S.random_row(4, [0, 1], "scale", 0.0, torch.zeros(4), [[0, 1, 3]], [[0, 1]], generator, [range(4)])
        assert sorted(picked) == [2, 3]


def test_random_control_refuses_a_site_without_enough_other_latents():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(InputError, match="needs 3 latents"):
        S.random_row(4, [0, 1, 2], "scale", 0.0, torch.zeros(4), [[0, 1, 2]], [[0, 1, 2]], generator, [range(4)])


def test_class_specificity_of_a_lone_class_and_of_a_class_without_images():
    """One class in the data: its score is its mean (nothing to subtract); a class without
    images scores zero, never NaN, so none of its latents is ranked."""
    z = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    scores = S.class_specificity(z, torch.tensor([0, 0]), 2)
    assert scores.tolist() == [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_collect_latents_concatenates_the_sites_in_order_in_eval_mode_and_of_no_images_is_empty():
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks="all", sae_width=5, sae_k=2,
                               gate_init_bias=0.0)  # (gates near 0.5: training-mode noise would change block 1's input)
    mean, std = (0.5,) * 3, (0.25,) * 3
    images = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        latents = model.eval()(T.normalize(images, mean, std), return_latents=True).latents
    z = S.collect_latents(model, images, mean, std, batch_size=2)
    torch.testing.assert_close(z, torch.cat([latents[0], latents[1]], dim=1))
    assert S.collect_latents(model, torch.zeros(0, 3, 8, 8), mean, std).shape == (0, 10)
    model.train()  # (a training model: the latents are still the inference gate's, and it stays training)
    torch.testing.assert_close(S.collect_latents(model, images, mean, std), z)
    assert model.training


def test_measure_in_small_batches_matches_the_model_and_of_no_inputs_is_zero():
    """Per-sample rows and labels follow their images across batches; usage is over every gated
    block's heads, block_usage one value per gated block; no inputs: zero usage, an empty mask."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, gate_init_bias=0.0, sae_width=8, sae_k=2)
    model.eval()
    x, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 10, (5,))
    scale, shift = torch.rand(5, 8) * 4, torch.randn(5, 8)
    with torch.no_grad():
        out = model(x, scale, shift)
    mask = out.head_mask.float()
    result = S.measure(model, x, labels, scale, shift, batch_size=2)
    assert result["correct"] == int((out.logits.argmax(-1) == labels).sum()) and result["n"] == 5
    assert torch.equal(result["mask"], mask)
    assert result["usage"] == pytest.approx(float(mask.mean()))
    torch.testing.assert_close(result["block_usage"], mask.mean(dim=(0, 2)))
    assert mask[:, 0].mean() != mask[:, 1].mean()  # (the blocks differ, so usage is over both)
    empty = S.measure(model, x[:0], labels[:0], None, None)
    assert (empty["correct"], empty["n"], empty["usage"], empty["mask"].shape) == (0, 0, 0.0, (0, 2, 6))
    assert empty["block_usage"].tolist() == [0.0, 0.0]


def test_usage_falls_equal_up_to_rounding_noise_still_go_to_fewer_latents(monkeypatch):
    """Two latents lowering usage by float noise (under 1e-6) more than one latent does is a tie: one latent."""
    config = S.SteeringConfig(counts=(2, 1), alphas=(0.0,), betas=(), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    _, _, _, table, _ = _crafted_latent_fit(
        monkeypatch, config, lambda scale, shift: (0.5 - 2e-7 * int((scale != 1).sum()), 0))
    assert [row["latents"] for row in table.info] == [[0], [4], [8]]


def test_a_class_keeping_no_head_unsteered_keeps_the_identity_row(monkeypatch):
    """No usage to lower (every head already pruned on the class's val images): identity rows,
    not a division by zero."""
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    _, _, _, table, _ = _crafted_latent_fit(monkeypatch, config, lambda scale, shift: (0.0, 0), unsteered_usage=0.0)
    assert torch.equal(table.scale, torch.ones(3, 16)) and torch.equal(table.shift, torch.zeros(3, 16))
    assert all(row["latents"] == [] and "note" not in row for row in table.info)


def test_a_class_without_training_images_gets_the_identity_row_and_says_why():
    torch.manual_seed(0)
    names = ["a", "b", "c"]

    def dataset(labels):
        return ImageDataset(torch.rand(len(labels), 3, 8, 8), torch.tensor(labels), names)

    splits = Splits(dataset([0, 1] * 10), dataset([0, 1, 2] * 2), dataset([0, 1, 2]), (0.5,) * 3, (0.25,) * 3)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(1.0,), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,))
    table, _ = S.fit_steering(model, splits, config, progress=False)
    assert torch.equal(table.scale[2], torch.ones(16)) and torch.equal(table.shift[2], torch.zeros(16))
    assert "no training images" in table.info[2]["note"]


def test_fit_steering_refuses_a_model_without_an_sae_before_any_work():
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_blocks=[])
    with pytest.raises(InputError, match="no SAE"):
        S.fit_steering(model, _Untouchable(), progress=False)


def test_fit_steering_seed_argument_overrides_the_configs(monkeypatch):
    """The seed argument replaces the config's seed, which the random controls draw with; the
    stage records it."""
    config = S.SteeringConfig(counts=(1,), alphas=(0.0,), betas=(), global_alphas=(0.0,), topk_ks=(1,),
                              topk_alphas=(0.0,), seed=0)
    controls = {}
    for seed in (None, 0, 1, 2, 3):
        _, _, _, table, stage = _crafted_latent_fit(monkeypatch, config, lambda scale, shift: (0.5, 0), seed=seed)
        assert stage["config"]["seed"] == (0 if seed is None else seed)
        controls[seed] = [row["random_latents"] for row in table.info]
    assert controls[None] == controls[0] and len({str(c) for c in controls.values()}) > 1


def test_topk_keeps_identity_unless_a_k_and_alpha_lower_usage(monkeypatch):
    """Top-k's (k, alpha) over all val images: each k's own rows, each of topk_alphas; identity
    (alpha 1) when no setting lowers usage."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(TINY, num_classes=3), sae_width=16, sae_k=4)
    monkeypatch.setattr(S, "collect_latents_normalized", lambda model, x, batch_size=512: torch.ones(len(x), 16))

    def choose(effects, alphas):  # (k, alpha) -> usage; unsteered 0.5
        def fake_measure(model, x, labels, scale, shift, batch_size=512):
            usage = 0.5
            if scale is not None:
                steered = scale[0][scale[0] != 1]
                usage = effects[(len(steered), float(steered[0]))]
            return dict(correct=len(x), n=len(x), usage=usage,
                        block_usage=torch.full((len(model.gate_blocks),), usage))

        monkeypatch.setattr(S, "measure", fake_measure)
        config = S.SteeringConfig(topk_ks=(1, 2), topk_alphas=alphas)
        return S._choose_topk(model, torch.zeros(6, 3, 8, 8), torch.tensor([0, 1, 2] * 2), 3, config)

    effects = {(1, 4.0): 0.75, (2, 4.0): 0.25, (1, 8.0): 0.75, (2, 8.0): 0.4}
    assert (choose(effects, (4.0, 8.0))["k"], choose(effects, (4.0, 8.0))["alpha"]) == (2, 4.0)
    rises = {key: 0.75 for key in effects}
    assert choose(rises, (4.0, 8.0))["alpha"] == 1.0


def test_row_info_without_a_table_or_with_an_entry_that_is_not_a_dict_is_empty():
    assert S.row_info(None, "a") == {}
    table = SteeringTable(["a"], torch.ones(1, 3), torch.zeros(1, 3), ["not a dict"])
    assert S.row_info(table, "a") == {}


def test_ranked_latents_with_equal_specificity_keep_latent_order():
    """Ties in specificity rank by latent index (a stable sort), so the ranking does not depend on
    the sort's implementation."""
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=TINY, sae_width=32, sae_k=2)
    scores = torch.tensor([[1.0, 2.0] * 16])
    assert S.ranked_latents(scores, model) == [[list(range(1, 32, 2)) + list(range(0, 32, 2))]]
