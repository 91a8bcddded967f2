"""Steering strategies over SAE latents (DESIGN.md "Steering strategies").

Every strategy is a pair of `steer_scale`/`steer_shift` vectors [B, S_total] (SAE widths
concatenated in site order) applied as `z' = z * scale + shift` ahead of the gates:

- global amplification: every active latent times alpha. Inactive latents are zero, so this is
  the constant row `scale = alpha` (`global_rows`).
- top-k amplification: each sample's k most active latents (per site) times alpha
  (`topk_rows`, computed from the sample's own unsteered latents).
- per-class steering (`fit_steering`): for class c, the latents most specific to c at each site,
  ranked on the TRAIN split by `mean(z | y = c) - mean(z | y != c)` (positive only). How many
  (`counts`) and how (scale by alpha, or shift by beta x the latent's mean activation on c in
  train) are chosen on the VALIDATION split only, by this objective:

      maximize the relative fall of head usage on class c's val images (the steered block(s):
      the last gated block when only it has an SAE, the whole model when every block has one)
      subject to: class c's val accuracy loses at most `max_val_loss` images (default 1).
      Ties: fewer latents, then the earlier setting in the grid. No candidate lowering usage ->
      identity row. The grid holds amplification (alpha > 1, positive shifts) and attenuation
      (alpha < 1, alpha = 0 ablation, negative shifts); the objective picks the direction. (On
      digits it picks attenuation: amplifying a class's latents makes these gates keep MORE heads.)
      A class without val images (nothing to choose on) gets the identity row; its info says why.

  The test split is never looked at here.
- random latents (`random_row`): a control with the same number of latents per site and the
  same setting (alpha, or the same shift magnitudes), the latents drawn at random (seeded) among
  those active on class c in train but not chosen, so an effect of "any perturbation of this
  size" is not mistaken for steering.

Global alpha and top-k (k, alpha) are chosen on val by the same rule over all val images, with
an allowance of one lost image per class.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from headsteer.runtime.bundle import SteeringTable
from headsteer.runtime.data import Splits
from headsteer.runtime.errors import InputError
from headsteer.runtime.gated_vit import GatedViT


@dataclass
class SteeringConfig:
    counts: tuple = (1, 2, 4, 8, 16, 32, 64)
    # scale mode: z_j * alpha (alpha > 1 amplifies, alpha < 1 attenuates, 0 ablates)
    alphas: tuple = (0.0, 0.25, 0.5, 2.0, 4.0, 8.0, 16.0)
    # shift mode: z_j + beta * (mean activation of latent j on class c in train)
    betas: tuple = (-2.0, -1.0, -0.5, 1.0, 2.0, 4.0)
    global_alphas: tuple = (0.0, 0.25, 0.5, 2.0, 4.0, 8.0, 16.0)
    topk_ks: tuple = (1, 2, 4, 8)
    topk_alphas: tuple = (0.0, 0.25, 0.5, 2.0, 4.0, 8.0, 16.0)
    max_val_loss: int = 1
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        """Refuse a grid the search cannot use, before any work: a NaN alpha blanks the gate input (no
        head kept, a 'usage fall' the search would pick), a negative count slices the ranking from its
        end, and an empty topk_ks leaves top-k without an unsteered setting. Numbers of any type
        (numpy's too) are kept as Python ints and floats, as the bundle's JSON records them."""
        def is_int(value, low):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low

        for name in ("counts", "topk_ks"):
            values = tuple(getattr(self, name))
            if not values or not all(is_int(v, 1) for v in values):
                raise InputError(f"SteeringConfig.{name} must be a non-empty tuple of positive ints, got {values!r}")
            setattr(self, name, tuple(int(v) for v in values))
        for name in ("alphas", "betas", "global_alphas", "topk_alphas"):
            values = tuple(getattr(self, name))
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise InputError(f"SteeringConfig.{name} must hold finite numbers, got {values!r}")
            setattr(self, name, tuple(float(v) for v in values))
        if not is_int(self.max_val_loss, 0):
            raise InputError(f"SteeringConfig.max_val_loss must be an int >= 0, got {self.max_val_loss!r}")
        if not is_int(self.batch_size, 1):
            raise InputError(f"SteeringConfig.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not is_int(self.seed, 0):
            raise InputError(f"SteeringConfig.seed must be an int >= 0, got {self.seed!r}")
        self.max_val_loss, self.batch_size, self.seed = int(self.max_val_loss), int(self.batch_size), int(self.seed)


# -- latents and vectors ---------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block (the inference gate, no dropout), then back in the
    mode it was in, also when the block raises: the caller's model may be training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_latents(
    model: GatedViT, images: torch.Tensor, mean, std, batch_size: int = 512
) -> torch.Tensor:
    """Unsteered SAE latents of `images` ([0, 1] pixels) at every site, concatenated in site
    order: [N, S_total] (eval mode, the inference gate)."""
    from headsteer.runtime.train import normalize

    return _site_latents(model, (normalize(images[start : start + batch_size], mean, std)
                                 for start in range(0, len(images), batch_size)))


def _site_latents(model: GatedViT, batches) -> torch.Tensor:
    """The SAE latents at every site, concatenated in site order, of each batch of model inputs,
    stacked: [N, S_total] (eval mode, the inference gate)."""
    chunks = []
    with eval_mode(model):
        for x in batches:
            out = model(x, return_latents=True)
            chunks.append(torch.cat([out.latents[b] for b in model.sae_blocks], dim=1))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.steer_width)


def class_specificity(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, S]: mean activation of each latent on class c minus its mean on every other class."""
    scores = torch.zeros(num_classes, z.shape[1])
    for c in range(num_classes):
        inside = labels == c
        if inside.any():
            rest = z[~inside].mean(0) if (~inside).any() else torch.zeros(z.shape[1])
            scores[c] = z[inside].mean(0) - rest
    return scores


def ranked_latents(scores: torch.Tensor, model: GatedViT) -> list[list[list[int]]]:
    """Per class, per site: latent indices (global, into S_total) with positive specificity, most
    specific first."""
    ranked = []
    for c in range(scores.shape[0]):
        per_site = []
        for offset, width in zip(model.sae_offsets, model.sae_widths):
            site = scores[c, offset : offset + width]
            order = torch.argsort(site, descending=True, stable=True)
            per_site.append([offset + int(j) for j in order if site[j] > 0])
        ranked.append(per_site)
    return ranked


def identity_row(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(width), torch.zeros(width)


def make_row(
    width: int, latents: Sequence[int], mode: str, value: float, magnitudes: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One steering row: `latents` scaled by `value` (mode "scale") or shifted by
    `value * magnitudes[latent]` (mode "shift"); every other latent untouched."""
    scale, shift = identity_row(width)
    index = torch.as_tensor(list(latents), dtype=torch.long)
    if len(index) == 0:
        return scale, shift
    outside = sorted({int(j) for j in index if not 0 <= int(j) < width})
    if outside:  # a negative index would silently steer a latent counted from the end
        raise InputError(f"steering latents must be indices in [0, {width}), got latent(s) {outside}")
    if mode == "scale":
        scale[index] = float(value)
    elif mode == "shift":
        if magnitudes is None:
            raise InputError("a shift row needs per-latent magnitudes")
        shift[index] = float(value) * magnitudes[index]
    else:
        raise InputError(f"steering mode must be 'scale' or 'shift', got {mode!r}")
    return scale, shift


def global_rows(batch: int, width: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global amplification: every active latent times alpha (inactive ones are zero anyway)."""
    return torch.full((batch, width), float(alpha)), torch.zeros(batch, width)


def topk_rows(z: torch.Tensor, k: int, alpha: float, model: GatedViT) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k amplification: per sample and per site, the k most active latents (of the sample's
    unsteered latents z [B, S_total]) times alpha. Only active latents (z > 0) count."""
    scale = torch.ones_like(z)
    for offset, width in zip(model.sae_offsets, model.sae_widths):
        site = z[:, offset : offset + width]
        kk = min(k, width)
        values, index = site.topk(kk, dim=1)
        chosen = torch.zeros_like(site, dtype=torch.bool).scatter(1, index, values > 0)
        scale[:, offset : offset + width] = torch.where(chosen, torch.full_like(site, float(alpha)), 1.0)
    return scale, torch.zeros_like(z)


def random_row(
    width: int,
    chosen: Sequence[int],
    mode: str,
    value: float,
    magnitudes: torch.Tensor,
    pool: Sequence[Sequence[int]],
    chosen_by_site: Sequence[Sequence[int]],
    generator: torch.Generator,
    site_latents: Sequence[Sequence[int]],
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[int]]:
    """The random-latent control of a per-class row: per site, as many latents as were chosen,
    drawn from `pool[site]` (latents active on the class in train) minus the chosen ones (falling
    back to any other latent of the site when the pool is short); same alpha, or (shift mode) the
    chosen latents' shift magnitudes given to the random ones. `site_latents[site]` lists every
    latent of the site (the fallback)."""
    scale, shift = identity_row(width)
    picked: list[int] = []
    excluded = set(chosen)
    for site_pool, site_chosen, site_all in zip(pool, chosen_by_site, site_latents):
        n = len(site_chosen)
        if n == 0:
            continue
        candidates = [j for j in site_pool if j not in excluded]
        draw = [candidates[int(i)] for i in torch.randperm(len(candidates), generator=generator)[:n]]
        if len(draw) < n:  # the pool is short: top up with other latents of the site
            rest = [j for j in site_all if j not in excluded and j not in set(candidates)]
            draw += [rest[int(i)] for i in torch.randperm(len(rest), generator=generator)[: n - len(draw)]]
        if len(draw) != n:
            raise InputError(f"the random control needs {n} latents outside the chosen ones; the site has too few")
        picked.extend(draw)
        if mode == "scale":
            for j in draw:
                scale[j] = float(value)
        else:
            for j, source in zip(draw, site_chosen):
                shift[j] = float(value) * magnitudes[source]
    return (scale, shift), picked


# -- measuring candidates -----------------------------------------------------------------------------
@torch.no_grad()
def measure(
    model: GatedViT,
    x: torch.Tensor,
    labels: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    batch_size: int = 512,
) -> dict:
    """Correct count, per-sample head usage and per-block usage for normalized inputs x with
    per-sample steering vectors (None = identity). No inputs: zero usage."""
    if len(x) == 0:
        mask = torch.zeros(0, len(model.gate_blocks), model.num_heads)
        return dict(correct=0, n=0, usage=0.0, block_usage=torch.zeros(len(model.gate_blocks)), mask=mask)
    correct, masks = 0, []
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        out = model(
            x[sl],
            None if scale is None else scale[sl],
            None if shift is None else shift[sl],
        )
        correct += int((out.logits.argmax(-1) == labels[sl]).sum())
        masks.append(out.head_mask.float())
    mask = torch.cat(masks)
    return dict(correct=correct, n=len(x), usage=float(mask.mean()), block_usage=mask.mean(dim=(0, 2)),
                mask=mask)


def steered_usage(result: dict, model: GatedViT) -> float:
    """The usage the objective lowers: the SAE blocks' own heads when only some blocks have an SAE
    (the paper's setting: the last block), the whole model when every gated block has one."""
    if set(model.sae_blocks) == set(model.gate_blocks):
        return result["usage"]
    positions = [model.gate_blocks.index(b) for b in model.sae_blocks]
    return float(result["block_usage"][positions].mean())


def _unsteered_reason(n_train: int, n_val: int) -> Optional[str]:
    """Why a class keeps the identity row when its data, not the objective, decided it."""
    if n_val == 0:
        return "no validation images of this class: nothing to choose its steering on; left unsteered"
    if n_train == 0:
        return "no training images of this class: no latents to rank; left unsteered"
    return None


def _better(candidate: tuple, best: Optional[tuple]) -> bool:
    """Candidates are (reduction, -n_latents, -grid position); larger is better."""
    return best is None or candidate > best


# -- fitting ---------------------------------------------------------------------------------------
def fit_steering(
    model: GatedViT,
    splits: Splits,
    config: SteeringConfig = SteeringConfig(),
    progress: bool = True,
    seed: Optional[int] = None,
) -> tuple[SteeringTable, dict]:
    """Choose every strategy's settings (train statistics, val choices) and build the per-class
    steering table. Returns (table, stage dict for the bundle's `extra`). Runs the model in eval
    mode and leaves it in the mode it was in."""
    if not model.sae_blocks:
        raise InputError("the model has no SAE; steering acts on SAE latents (train an SAE first)")
    if seed is not None:
        config = SteeringConfig(**{**asdict(config), "seed": seed})
    with eval_mode(model):
        return _fit_steering(model, splits, config, progress)


def _fit_steering(model: GatedViT, splits: Splits, config: SteeringConfig, progress: bool) -> tuple[SteeringTable, dict]:
    """`fit_steering`'s work, the model in eval mode."""
    from headsteer.runtime.train import normalize

    start = time.perf_counter()
    names = splits.class_names
    num_classes = len(names)
    width = model.steer_width

    z_train = collect_latents(model, splits.train.images, splits.mean, splits.std, config.batch_size)
    y_train = splits.train.labels
    scores = class_specificity(z_train, y_train, num_classes)
    ranked = ranked_latents(scores, model)
    class_means = torch.stack([z_train[y_train == c].mean(0) if (y_train == c).any() else torch.zeros(width)
                               for c in range(num_classes)])
    x_val = normalize(splits.val.images, splits.mean, splits.std)
    y_val = splits.val.labels
    generator = torch.Generator().manual_seed(config.seed)

    scale_rows, shift_rows, info = [], [], []
    bar = tqdm(range(num_classes), disable=not progress, desc="steering (val)", unit="class", leave=False,
               dynamic_ncols=True)
    for c in bar:
        idx = (y_val == c).nonzero().squeeze(1)
        xc, yc = x_val[idx], y_val[idx]
        base = measure(model, xc, yc, None, None, config.batch_size)
        base_usage = steered_usage(base, model)
        best, best_setting = None, None
        per_site = ranked[c] if len(xc) else []  # no val images: nothing to choose on
        position = 0  # place in the whole grid (counts, then scale before shift, then values): the last tie-break
        for count in config.counts:
            chosen_by_site = [site[:count] for site in per_site]
            chosen = [j for site in chosen_by_site for j in site]
            if not chosen:
                continue
            for mode, values in (("scale", config.alphas), ("shift", config.betas)):
                for value in values:
                    position += 1
                    scale, shift = make_row(width, chosen, mode, value, class_means[c])
                    result = measure(model, xc, yc, scale.expand(len(xc), -1), shift.expand(len(xc), -1),
                                     config.batch_size)
                    if result["correct"] < base["correct"] - config.max_val_loss:
                        continue
                    usage = steered_usage(result, model)
                    reduction = (base_usage - usage) / base_usage if base_usage > 0 else 0.0
                    key = (round(reduction, 6), -len(chosen), -position)
                    if reduction > 0 and _better(key, best):
                        best = key
                        best_setting = dict(count=count, mode=mode, value=float(value), chosen=chosen,
                                            chosen_by_site=chosen_by_site, val_correct=result["correct"],
                                            val_usage=usage)
        row_info = dict(
            **{"class": names[c]},
            val_n=len(xc),
            val_correct_unsteered=base["correct"],
            val_usage_unsteered=base_usage,
        )
        if best_setting is None:
            scale, shift = identity_row(width)
            row_info.update(latents=[], latents_by_block={}, mode="scale", alpha=1.0, beta=None,
                            val_correct_steered=base["correct"], val_usage_steered=base_usage,
                            random_latents=[], random_scale_latents=[], random_shift={})
            note = _unsteered_reason(int((y_train == c).sum()), len(xc))
            if note:
                row_info["note"] = note
        else:
            s = best_setting
            scale, shift = make_row(width, s["chosen"], s["mode"], s["value"], class_means[c])
            site_latents = [range(off, off + w) for off, w in zip(model.sae_offsets, model.sae_widths)]
            pool = [[j for j in site if class_means[c, j] > 0] for site in site_latents]
            (_, rshift), picked = random_row(width, s["chosen"], s["mode"], s["value"], class_means[c], pool,
                                             s["chosen_by_site"], generator, site_latents)
            row_info.update(
                latents=s["chosen"],
                latents_by_block={str(b): site for b, site in zip(model.sae_blocks, s["chosen_by_site"])},
                mode=s["mode"],
                alpha=s["value"] if s["mode"] == "scale" else 1.0,
                beta=s["value"] if s["mode"] == "shift" else None,
                val_correct_steered=s["val_correct"],
                val_usage_steered=s["val_usage"],
                random_latents=picked,
                random_scale_latents=picked if s["mode"] == "scale" else [],
                random_shift={str(j): float(rshift[j]) for j in picked} if s["mode"] == "shift" else {},
            )
        scale_rows.append(scale)
        shift_rows.append(shift)
        info.append(row_info)
    table = SteeringTable(list(names), torch.stack(scale_rows), torch.stack(shift_rows), info)

    global_choice = _choose_global(model, x_val, y_val, num_classes, config)
    topk_choice = _choose_topk(model, x_val, y_val, num_classes, config)
    stage = dict(
        recipe="steering",
        config=asdict(config),
        sae_blocks=list(model.sae_blocks),
        objective=(
            "per class: maximize the relative fall of the steered blocks' head usage on that class's val "
            f"images, subject to losing at most {config.max_val_loss} val image(s) of that class; latents "
            "ranked by mean activation on the class minus the rest on train"
        ),
        global_amplification=global_choice,
        topk_amplification=topk_choice,
        seconds=time.perf_counter() - start,
    )
    return table, stage


def _choose_overall(model, x_val, y_val, num_classes, config, candidates) -> dict:
    """Best (reduction) of `candidates` [(settings dict, scale, shift)] on all val images, losing
    at most one val image per class."""
    base = measure(model, x_val, y_val, None, None, config.batch_size)
    base_usage = steered_usage(base, model)
    best, chosen = None, None
    for rank, (setting, scale, shift) in enumerate(candidates):
        result = measure(model, x_val, y_val, scale, shift, config.batch_size)
        if result["correct"] < base["correct"] - num_classes * config.max_val_loss:
            continue
        usage = steered_usage(result, model)
        reduction = (base_usage - usage) / base_usage if base_usage > 0 else 0.0
        key = (round(reduction, 6), -rank)
        if _better(key, best):
            best, chosen = key, dict(setting, val_usage=usage, val_correct=result["correct"],
                                     val_usage_unsteered=base_usage, val_correct_unsteered=base["correct"])
    return chosen


def _choose_global(model, x_val, y_val, num_classes, config) -> dict:
    n, width = len(x_val), model.steer_width
    candidates = [(dict(alpha=1.0), None, None)]
    candidates += [(dict(alpha=float(a)), *global_rows(n, width, a)) for a in config.global_alphas]
    return _choose_overall(model, x_val, y_val, num_classes, config, candidates)


def _choose_topk(model, x_val, y_val, num_classes, config) -> dict:
    z = collect_latents_normalized(model, x_val, config.batch_size)
    candidates = [(dict(k=int(config.topk_ks[0]), alpha=1.0), None, None)]
    for k in config.topk_ks:
        for a in config.topk_alphas:
            candidates.append((dict(k=int(k), alpha=float(a)), *topk_rows(z, k, a, model)))
    return _choose_overall(model, x_val, y_val, num_classes, config, candidates)


@torch.no_grad()
def collect_latents_normalized(model: GatedViT, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Like `collect_latents` for inputs that are already normalized."""
    return _site_latents(model, (x[start : start + batch_size] for start in range(0, len(x), batch_size)))


def row_info(table: Optional[SteeringTable], name: str) -> dict:
    """The provenance `table.info` records for the row named `name` (info is one entry per row, in
    the table's row order, which need not be the bundle's class order); {} if none."""
    if table is None or not table.info or name not in table.class_names:
        return {}
    entry = table.info[table.class_names.index(name)]
    return entry if isinstance(entry, dict) else {}


def _latent_index(value, width: int, where: str) -> int:
    """`value` (an int, or its string as JSON object keys hold it) as a latent index in [0, width);
    InputError naming `where` otherwise (a negative index would wrap to another latent)."""
    index = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        try:
            index = int(value)
        except ValueError:
            pass
    if index is None or not 0 <= index < width:
        raise InputError(f"{where}: latent {value} is not an index in [0, {width})")
    return index


def _finite_number(value, where: str, what: str) -> float:
    """`value` as a finite float; InputError naming `where` and `what` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InputError(f"{where}: {what} must be a finite number, got {value!r}")


def random_table(table: SteeringTable, width: int) -> SteeringTable:
    """The random-latent control rows recorded in `table.info` as a SteeringTable of their own
    (same row names). InputError if the table records no info (no control rows to rebuild), or if
    a recorded latent is outside [0, width) or a recorded alpha or shift is not finite."""
    if not table.info:
        raise InputError(
            "this steering table records no per-row info, so it has no random-latent control rows "
            "(fit_steering records them); evaluate it without the random control"
        )
    scale_rows, shift_rows = [], []
    for name, entry in zip(table.class_names, table.info):  # one entry per row, in row order
        row = entry if isinstance(entry, dict) else {}
        where = f"steering row {name!r} random control"
        scale, shift = identity_row(width)
        for j in row.get("random_scale_latents", []):
            scale[_latent_index(j, width, where)] = _finite_number(row.get("alpha", 1.0), where, "alpha")
        for j, value in row.get("random_shift", {}).items():
            shift[_latent_index(j, width, where)] = _finite_number(value, where, "shift")
        scale_rows.append(scale)
        shift_rows.append(shift)
    return SteeringTable(list(table.class_names), torch.stack(scale_rows), torch.stack(shift_rows), [])
