"""Evaluate a bundle through `Engine` (the path users get): per-class accuracy, head usage (whole
model and final gated block), kept heads, under no steering, a class's steering row, or per-class
(oracle) steering; the strategies of the design on a whole split; steered vs unsteered latency.

`headsteer eval BUNDLE --data SPEC [--split test] [--steer CLASS|per-class|none] [--json FILE]`
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from headsteer.runtime.bundle import SteeringTable
from headsteer.runtime.data import ImageDataset, load_data
from headsteer.runtime.engine import Engine
from headsteer.runtime.errors import InputError
from headsteer.runtime.files import write_text_atomic

SPLITS = ("train", "val", "test")


# -- running the engine ------------------------------------------------------------------------------
def normalized(engine: Engine, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the bundle's normalized model input."""
    return engine.normalize(images)


def run_engine(
    engine: Engine,
    images: torch.Tensor,
    steer=None,
    vectors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels [N], head_mask [N, L, H]) for [0, 1] images.

    `steer` goes to `Engine.predict` (None, a class, or one target per image); `vectors` are raw
    per-image (scale, shift) [N, S] for strategies that are not table rows (global, top-k,
    random), passed to `Engine.predict` as raw vectors."""
    labels, masks = [], []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x = normalized(engine, images[sl])
        if vectors is None:
            target = steer[sl] if isinstance(steer, (list, tuple)) else steer
            pred = engine.predict(x, steer=target)
            labels.append(pred.labels)
            masks.append(pred.head_mask)
        else:
            scale, shift = vectors
            pred = engine.predict(x, steer_scale=scale[sl], steer_shift=shift[sl])
            labels.append(pred.labels)
            masks.append(pred.head_mask)
    return torch.cat(labels), torch.cat(masks)


@torch.no_grad()
def engine_latents(engine: Engine, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unsteered SAE latents [N, S_total] (site order) from the engine's model."""
    model = engine.model
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalized(engine, images[start : start + batch_size]).to(engine.device)
        out = model(x, backend=engine.backend, return_latents=True)
        chunks.append(torch.cat([out.latents[b] for b in model.sae_blocks], dim=1).cpu())
    return torch.cat(chunks)


# -- summaries -----------------------------------------------------------------------------------------
def summarize(pred: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict:
    """accuracy, correct, head_usage (whole model), final_block_usage, kept_heads (heads of the
    final gated block kept by a majority of the images), final_block_head_usage (per head of the
    final block, the fraction of images keeping it)."""
    maskf = mask.float()
    n = len(labels)
    if maskf.shape[1] == 0:
        return dict(accuracy=float((pred == labels).float().mean()) if n else 0.0, correct=int((pred == labels).sum()),
                    head_usage=1.0, final_block_usage=1.0, kept_heads=None, final_block_head_usage=None)
    final = maskf[:, -1]
    return dict(
        accuracy=float((pred == labels).float().mean()) if n else 0.0,
        correct=int((pred == labels).sum()),
        head_usage=float(maskf.mean()) if n else 0.0,
        final_block_usage=float(final.mean()) if n else 0.0,
        kept_heads=[h for h in range(final.shape[1]) if n and float(final[:, h].mean()) > 0.5],
        final_block_head_usage=[float(v) for v in final.mean(0)] if n else [0.0] * final.shape[1],
    )


def _class_setting(table: Optional[SteeringTable], c: int) -> dict:
    if table is None or c >= len(table.info):
        return dict(latents=[], alpha=1.0)
    row = table.info[c]
    setting = dict(latents=list(row.get("latents", [])), alpha=float(row.get("alpha", 1.0)))
    if row.get("mode") == "shift":
        setting.update(mode="shift", beta=row.get("beta"))
    return setting


def per_class_table(
    engine: Engine,
    dataset: ImageDataset,
    steer: Union[None, str, int] = "per-class",
    random_control: bool = False,
    batch_size: int = 256,
    others: Optional[dict] = None,
) -> list[dict]:
    """One row per class: class, n_test, latents, alpha, unsteered {...}, steered {...} (and
    `random` {...} with `random_control`: the class's random-latent control row; and one part per
    entry of `others`, name -> per-image (scale, shift) [N, S], e.g. the global strategy). Each part holds
    accuracy, correct, head_usage, final_block_usage, kept_heads over that class's images.

    steer: "per-class" (each image steered by its own class's row: the paper's per-class
    analysis), a class name/index (every image steered by that row), or None."""
    table = engine.info.steering
    names = engine.class_names
    if list(dataset.class_names) != list(names):
        raise InputError(f"the data's classes {dataset.class_names[:10]} are not the bundle's {names[:10]}")
    if steer is not None and table is None:
        raise InputError("this bundle has no steering table; use --steer none")
    labels = dataset.labels
    pred_u, mask_u = run_engine(engine, dataset.images, None, batch_size=batch_size)
    fixed = None
    if steer == "per-class":
        pred_s, mask_s = run_engine(engine, dataset.images, [int(y) for y in labels], batch_size=batch_size)
    elif steer is not None:
        fixed = table.index_of(steer)
        pred_s, mask_s = run_engine(engine, dataset.images, fixed, batch_size=batch_size)
    if random_control:
        from headsteer.runtime.steering import random_table

        rand = random_table(table, engine.steer_width)
        rows = rand.rows([int(y) for y in labels])
        pred_r, mask_r = run_engine(engine, dataset.images, vectors=rows, batch_size=batch_size)
    other_runs = {key: run_engine(engine, dataset.images, vectors=rows, batch_size=batch_size)
                  for key, rows in (others or {}).items()}
    result = []
    for c, name in enumerate(names):
        idx = (labels == c).nonzero().squeeze(1)
        setting = _class_setting(table, c if fixed is None else fixed)
        row = {"class": name, "n_test": len(idx), **setting}
        if fixed is not None:
            row["steered_toward"] = names[fixed]
        row["unsteered"] = summarize(pred_u[idx], mask_u[idx], labels[idx])
        row["steered"] = summarize(pred_s[idx], mask_s[idx], labels[idx]) if steer is not None else None
        if random_control:
            row["random"] = dict(summarize(pred_r[idx], mask_r[idx], labels[idx]),
                                 latents=list(table.info[c].get("random_latents", [])))
        for key, (pred_o, mask_o) in other_runs.items():
            row[key] = summarize(pred_o[idx], mask_o[idx], labels[idx])
        result.append(row)
    return result


def meets_target(row: dict, part: str = "steered", min_reduction: float = 0.4, max_lost: int = 1) -> bool:
    """The issue's per-class target: final-block usage falls by >= 40% and the class loses at
    most one image."""
    base, other = row["unsteered"], row.get(part)
    if not other or base["final_block_usage"] <= 0:
        return False
    reduction = (base["final_block_usage"] - other["final_block_usage"]) / base["final_block_usage"]
    return reduction >= min_reduction - 1e-9 and other["correct"] >= base["correct"] - max_lost


def strategies_summary(engine: Engine, dataset: ImageDataset, choices: dict, batch_size: int = 256) -> dict:
    """Every strategy on the whole split: {name: {test_accuracy, head_usage, final_block_usage}}.

    choices: the steering stage record ({global_amplification: {alpha}, topk_amplification:
    {k, alpha}}) chosen on val. per_class and random_latents steer each image by its own class's
    row (oracle class), as in the per-class table."""
    from headsteer.runtime.steering import global_rows, random_table, topk_rows

    table = engine.info.steering
    labels = dataset.labels
    n, width = len(labels), engine.steer_width

    def entry(pred, mask, **setting):
        s = summarize(pred, mask, labels)
        return dict(test_accuracy=s["accuracy"], head_usage=s["head_usage"], final_block_usage=s["final_block_usage"],
                    **setting)

    out = {"none": entry(*run_engine(engine, dataset.images, None, batch_size=batch_size))}
    g = (choices or {}).get("global_amplification") or dict(alpha=1.0)
    out["global_amplification"] = entry(
        *run_engine(engine, dataset.images, vectors=global_rows(n, width, g["alpha"]), batch_size=batch_size),
        alpha=g["alpha"],
    )
    t = (choices or {}).get("topk_amplification") or dict(k=1, alpha=1.0)
    z = engine_latents(engine, dataset.images, batch_size)
    out["topk_amplification"] = entry(
        *run_engine(engine, dataset.images, vectors=topk_rows(z, t["k"], t["alpha"], engine.model),
                    batch_size=batch_size),
        k=t["k"], alpha=t["alpha"],
    )
    targets = [int(y) for y in labels]
    out["per_class"] = entry(*run_engine(engine, dataset.images, targets, batch_size=batch_size))
    rand = random_table(table, width)
    out["random_latents"] = entry(*run_engine(engine, dataset.images, vectors=rand.rows(targets),
                                              batch_size=batch_size))
    return out


def measure_latency(engine: Engine, dataset: ImageDataset, repeats: int = 7, batch_size: int = 64) -> dict:
    """Median wall time of classifying the split, unsteered vs per-class steered (each class's
    images batched together, steered by that class's row; compact backend skips pruned heads).
    Alternates the two settings each repeat so machine load hits both alike."""
    labels = dataset.labels
    batches = []
    for c in range(len(engine.class_names)):
        idx = (labels == c).nonzero().squeeze(1)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            batches.append((normalized(engine, dataset.images[part]), c))
    timings = {"unsteered": [], "steered": []}
    for name in ("unsteered", "steered"):  # warm-up
        for x, c in batches[:2]:
            engine.predict(x, steer=c if name == "steered" else None)
    for _ in range(repeats):
        for name in ("unsteered", "steered"):
            start = time.perf_counter()
            for x, c in batches:
                engine.predict(x, steer=c if name == "steered" else None)
            timings[name].append(time.perf_counter() - start)
    n = max(1, len(labels))
    u, s = statistics.median(timings["unsteered"]), statistics.median(timings["steered"])
    return dict(
        backend=engine.backend,
        images=len(labels),
        repeats=repeats,
        batch_size=batch_size,
        threads=torch.get_num_threads(),
        unsteered_ms_per_image=1000 * u / n,
        steered_ms_per_image=1000 * s / n,
        speedup=u / s if s > 0 else None,
    )


# -- formatting ------------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    """The per-class table as aligned text."""
    head = (f"{'class':>8} {'n':>4} {'#lat':>4} {'alpha':>6} | {'acc':>6} {'acc*':>6} | {'usage':>6} {'usage*':>6} "
            f"| {'final':>6} {'final*':>6} {'drop':>6} | {'kept*':<14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        u, s = r["unsteered"], r["steered"] or r["unsteered"]
        drop = (u["final_block_usage"] - s["final_block_usage"]) / u["final_block_usage"] if u["final_block_usage"] else 0.0
        setting = f"{r['alpha']:.2g}" if r.get("mode") != "shift" else f"+{r.get('beta'):.2g}m"
        lines.append(
            f"{str(r['class'])[:8]:>8} {r['n_test']:>4} {len(r['latents']):>4} {setting:>6} | "
            f"{u['accuracy']:>6.3f} {s['accuracy']:>6.3f} | {u['head_usage']:>6.3f} {s['head_usage']:>6.3f} | "
            f"{u['final_block_usage']:>6.3f} {s['final_block_usage']:>6.3f} {drop:>6.1%} | "
            f"{','.join(map(str, s['kept_heads'] or [])):<14}"
        )
    lines.append("(* = steered; final = the last gated block; drop = relative fall of final-block usage)")
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--data", default="digits", help="digits, cifar100:PATH or imagefolder:PATH")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0, help="data split seed (the one the bundle was trained with)")
    parser.add_argument("--steer", default="per-class",
                        help="per-class (each image by its own class's row), a class name, or none")
    parser.add_argument("--random-control", action="store_true", help="also run the random-latent control rows")
    parser.add_argument("--backend", default="compact", help="reference, compact, triton (default compact)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise InputError(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    engine = Engine.load(args.bundle, backend=args.backend, device=args.device)
    steer = None if args.steer in (None, "none") else args.steer
    if steer is not None and steer != "per-class" and engine.info.steering is None:
        raise InputError("this bundle has no steering table; use --steer none")
    if steer is not None and steer != "per-class":
        engine.info.steering.index_of(steer)  # unknown class: fail before loading data
    if steer == "per-class" and engine.info.steering is None:
        steer = None
    splits = load_data(args.data, image_size=engine.image_size[0], seed=args.seed)
    dataset = getattr(splits, args.split)
    rows = per_class_table(engine, dataset, steer, random_control=args.random_control and steer is not None)
    print(format_table(rows))
    if steer is not None:
        hit = sum(meets_target(r) for r in rows)
        print(f"{hit} of {len(rows)} classes: final-block usage down >= 40% losing <= 1 image")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0
