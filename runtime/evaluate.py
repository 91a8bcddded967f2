"""Evaluate a bundle through `Engine` (the path users get): per-class accuracy, head usage (whole
model and the steered block(s): those with an SAE), kept heads, under no steering, a class's
steering row, or per-class (oracle) steering; the strategies of the design on a whole split;
steered vs unsteered latency. Steering rows are looked up by class name, so a table whose rows
are in another order, or cover only some classes, steers each image with its own class's row
(classes without one stay unsteered).

`headsteer eval BUNDLE --data SPEC [--split test] [--steer CLASS|per-class|none] [--json FILE]`
splits the data with the seed the bundle records (the one it was trained with), so its test
split holds no training image.
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
from headsteer.runtime.data import ImageDataset, load_data, resolve_split_seed
from headsteer.runtime.engine import BACKEND_NAMES, TORCH_BACKENDS, Engine
from headsteer.runtime.errors import InputError
from headsteer.runtime.files import write_text_atomic

SPLITS = ("train", "val", "test")


# -- running the engine ------------------------------------------------------------------------------
def check_vectors(vectors, n: int, width: int, what: str) -> None:
    """Raw (scale, shift) vectors must be float tensors [n, width]: one row per image. Checked
    before any work (rows past the last image would otherwise be dropped batch by batch)."""
    if not (isinstance(vectors, (tuple, list)) and len(vectors) == 2):
        raise InputError(f"{what}: expected a (scale, shift) pair of [{n}, {width}] tensors")
    for name, vector in zip(("scale", "shift"), vectors):
        if not isinstance(vector, torch.Tensor) or not vector.is_floating_point() or tuple(vector.shape) != (n, width):
            got = list(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise InputError(f"{what}: {name} must be a float tensor [{n}, {width}], one row per image; got {got}")


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
    random), passed to `Engine.predict` as raw vectors. No images is an InputError."""
    if len(images) == 0:
        raise InputError("no images to evaluate: the split is empty")
    if vectors is not None:
        check_vectors(vectors, len(images), engine.steer_width, "steering vectors")
    elif isinstance(steer, (list, tuple)) and len(steer) != len(images):
        raise InputError(f"{len(steer)} steering targets for {len(images)} images; expected one target per image")
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
    """Unsteered SAE latents [N, S_total] (site order) from the engine's model, fed as
    `Engine.predict` feeds it (its device and dtype). An engine that runs an exported file
    (onnxruntime, tensorrt) gets them from its bundle's torch model on the reference backend."""
    model = engine.model
    backend = engine.backend if engine.backend in TORCH_BACKENDS else "reference"
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalized(engine, images[start : start + batch_size]).to(device=engine.device, dtype=engine.dtype)
        out = model(x, backend=backend, return_latents=True)
        chunks.append(torch.cat([out.latents[b] for b in model.sae_blocks], dim=1).cpu())
    return torch.cat(chunks)


# -- summaries -----------------------------------------------------------------------------------------
def steered_sites(engine: Engine) -> list[tuple[int, int]]:
    """(block, position in head_mask) of every block with an SAE, the blocks steering acts on."""
    gated = list(engine.info.config.get("gated_blocks", []))
    blocks = [site["block"] for site in engine.info.config.get("sae_sites", [])]
    return [(b, gated.index(b)) for b in blocks if b in gated]


def _kept(block_mask: torch.Tensor) -> list[int]:
    """Heads kept by a majority of the images ([n, H] float mask)."""
    n = len(block_mask)
    return [h for h in range(block_mask.shape[1]) if n and float(block_mask[:, h].mean()) > 0.5]


def summarize(pred: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              sites: Sequence[tuple[int, int]] = ()) -> dict:
    """accuracy, correct, head_usage (whole model); at the steered blocks (`sites`, from
    `steered_sites`): steered_block_usage (mean over their heads; None without an SAE) and
    steered_kept_heads ({block: heads kept by a majority of the images}); at the last gated block:
    final_block_usage, kept_heads and final_block_head_usage (per head, the fraction keeping it)."""
    maskf = mask.float()
    n = len(labels)
    accuracy = float((pred == labels).float().mean()) if n else 0.0
    if maskf.shape[1] == 0:
        return dict(accuracy=accuracy, correct=int((pred == labels).sum()), head_usage=1.0,
                    steered_block_usage=None, steered_kept_heads=None,
                    final_block_usage=1.0, kept_heads=None, final_block_head_usage=None)
    final = maskf[:, -1]
    positions = [p for _, p in sites]
    return dict(
        accuracy=accuracy,
        correct=int((pred == labels).sum()),
        head_usage=float(maskf.mean()) if n else 0.0,
        steered_block_usage=(float(maskf[:, positions].mean()) if n else 0.0) if positions else None,
        steered_kept_heads={str(b): _kept(maskf[:, p]) for b, p in sites} if positions else None,
        final_block_usage=float(final.mean()) if n else 0.0,
        kept_heads=_kept(final),
        final_block_head_usage=[float(v) for v in final.mean(0)] if n else [0.0] * final.shape[1],
    )


def target_usage(part: dict) -> float:
    """The usage steering is judged by: the steered blocks', or the last gated block's for a
    summary without one (no SAE, or written before steered_block_usage existed)."""
    usage = part.get("steered_block_usage")
    return part["final_block_usage"] if usage is None else usage


def _class_setting(table: Optional[SteeringTable], name: Optional[str]) -> dict:
    """The latents and alpha (or shift) of the steering row named `name` (None: unsteered)."""
    from headsteer.runtime.steering import row_info

    row = row_info(table, name) if name is not None else {}
    setting = dict(latents=list(row.get("latents", [])), alpha=float(row.get("alpha", 1.0)))
    if row.get("mode") == "shift":
        setting.update(mode="shift", beta=row.get("beta"))
    return setting


def own_row(table: Optional[SteeringTable], name: str) -> Optional[str]:
    """`name` if the steering table has a row for that class, else None (the class stays unsteered)."""
    return name if table is not None and name in table.class_names else None


def class_targets(table: Optional[SteeringTable], names: Sequence[str], labels: torch.Tensor) -> list:
    """Each image's own class name when the table has a row of that name, else None (unsteered)."""
    return [own_row(table, names[int(y)]) for y in labels]


def per_class_table(
    engine: Engine,
    dataset: ImageDataset,
    steer: Union[None, str, int] = "per-class",
    random_control: bool = False,
    batch_size: int = 256,
    others: Optional[dict] = None,
) -> list[dict]:
    """One row per class: class, n_test, steered_blocks, steering_row (the table row steering this
    class's images, None: unsteered), latents, alpha, unsteered {...}, steered {...} (and `random`
    {...} with `random_control`: the random-latent control of that row; and one part per entry of
    `others`, name -> per-image (scale, shift) [N, S], e.g. the global strategy). Each part is a
    `summarize` over that class's images.

    steer: "per-class" (each image steered by its own class's row: the paper's per-class
    analysis; classes the table has no row for stay unsteered), a class name or bundle class
    index (every image steered by that class's row), or None."""
    from headsteer.runtime.steering import random_table, row_info

    table = engine.info.steering
    names = list(engine.class_names)
    if list(dataset.class_names) != names:
        raise InputError(f"the data's classes {dataset.class_names[:10]} are not the bundle's {names[:10]}")
    if steer is not None and table is None:
        raise InputError("this bundle has no steering table; use --steer none")
    if random_control and steer is None:
        raise InputError("random_control compares steering rows with random ones; it needs steer (not None)")
    labels = dataset.labels
    for key, rows in (others or {}).items():
        check_vectors(rows, len(labels), engine.steer_width, key)
    sites = steered_sites(engine)
    fixed = engine.info.steering_row(steer) if steer not in (None, "per-class") else None
    targets = class_targets(table, names, labels) if fixed is None else [fixed] * len(labels)
    rand = random_table(table, engine.steer_width) if random_control else None  # fails before any work
    pred_u, mask_u = run_engine(engine, dataset.images, None, batch_size=batch_size)
    if steer is not None:
        pred_s, mask_s = run_engine(engine, dataset.images, targets, batch_size=batch_size)
    if rand is not None:
        pred_r, mask_r = run_engine(engine, dataset.images, vectors=rand.rows(targets), batch_size=batch_size)
    other_runs = {key: run_engine(engine, dataset.images, vectors=rows, batch_size=batch_size)
                  for key, rows in (others or {}).items()}
    result = []
    for c, name in enumerate(names):
        idx = (labels == c).nonzero().squeeze(1)
        row_name = fixed if fixed is not None else (own_row(table, name) if steer is not None else None)
        row = {"class": name, "n_test": len(idx), "steered_blocks": [b for b, _ in sites],
               "steering_row": row_name, **_class_setting(table, row_name)}
        if fixed is not None:
            row["steered_toward"] = fixed
        row["unsteered"] = summarize(pred_u[idx], mask_u[idx], labels[idx], sites)
        row["steered"] = summarize(pred_s[idx], mask_s[idx], labels[idx], sites) if steer is not None else None
        if rand is not None:
            random_latents = row_info(table, row_name).get("random_latents", []) if row_name else []
            row["random"] = dict(summarize(pred_r[idx], mask_r[idx], labels[idx], sites),
                                 latents=list(random_latents))
        for key, (pred_o, mask_o) in other_runs.items():
            row[key] = summarize(pred_o[idx], mask_o[idx], labels[idx], sites)
        result.append(row)
    return result


def meets_target(row: dict, part: str = "steered", min_reduction: float = 0.4, max_lost: int = 1) -> bool:
    """The issue's per-class target: head usage at the steered block(s) (`target_usage`) falls by
    >= 40% and the class loses at most one image."""
    base, other = row["unsteered"], row.get(part)
    if not other or target_usage(base) <= 0:
        return False
    reduction = (target_usage(base) - target_usage(other)) / target_usage(base)
    return reduction >= min_reduction - 1e-9 and other["correct"] >= base["correct"] - max_lost


def strategies_summary(engine: Engine, dataset: ImageDataset, choices: dict, batch_size: int = 256) -> dict:
    """Every strategy on the whole split: {name: {test_accuracy, head_usage, steered_block_usage,
    final_block_usage}}.

    choices: the steering stage record ({global_amplification: {alpha}, topk_amplification:
    {k, alpha}}) chosen on val. per_class and random_latents steer each image by its own class's
    row (oracle class; classes without a row unsteered), as in the per-class table. A bundle without
    a steering table, or whose table records no random-latent control rows, is an InputError before
    any work."""
    from headsteer.runtime.steering import global_rows, random_table, topk_rows

    table = engine.info.steering
    labels = dataset.labels
    n, width = len(labels), engine.steer_width
    sites = steered_sites(engine)
    if table is None:
        raise InputError("this bundle has no steering table: per_class and random_latents need its rows")
    rand = random_table(table, width)  # fails before any work if the table records no control rows

    def entry(pred, mask, **setting):
        s = summarize(pred, mask, labels, sites)
        return dict(test_accuracy=s["accuracy"], head_usage=s["head_usage"],
                    steered_block_usage=s["steered_block_usage"], final_block_usage=s["final_block_usage"],
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
    targets = class_targets(table, engine.class_names, labels)
    out["per_class"] = entry(*run_engine(engine, dataset.images, targets, batch_size=batch_size))
    out["random_latents"] = entry(*run_engine(engine, dataset.images, vectors=rand.rows(targets),
                                              batch_size=batch_size))
    return out


def measure_latency(engine: Engine, dataset: ImageDataset, repeats: int = 7, batch_size: int = 64) -> dict:
    """Median wall time of classifying the split, unsteered vs per-class steered (each class's
    images batched together, steered by that class's row, or unsteered if the table has none;
    compact backend skips pruned heads). Alternates the two settings each repeat so machine load
    hits both alike. No images is an InputError (there is nothing to time)."""
    labels = dataset.labels
    if len(labels) == 0:
        raise InputError("no images to evaluate: the split is empty")
    batches = []
    for c, name in enumerate(engine.class_names):
        idx = (labels == c).nonzero().squeeze(1)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            batches.append((normalized(engine, dataset.images[part]), own_row(engine.info.steering, name)))
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
def _kept_text(part: dict) -> str:
    """Kept heads at the steered block(s) ("2,5"; "b1:2,5 b3:0" for several), else the last block's."""
    by_block = part.get("steered_kept_heads")
    if not by_block:
        return ",".join(map(str, part["kept_heads"] or []))
    if len(by_block) == 1:
        return ",".join(map(str, next(iter(by_block.values()))))
    return " ".join(f"b{b}:" + ",".join(map(str, heads)) for b, heads in by_block.items())


def format_table(rows: Sequence[dict]) -> str:
    """The per-class table as aligned text."""
    head = (f"{'class':>8} {'n':>4} {'#lat':>4} {'alpha':>6} | {'acc':>6} {'acc*':>6} | {'usage':>6} {'usage*':>6} "
            f"| {'block':>6} {'block*':>6} {'drop':>6} | {'kept*':<14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        u, s = r["unsteered"], r["steered"] or r["unsteered"]
        drop = (target_usage(u) - target_usage(s)) / target_usage(u) if target_usage(u) else 0.0
        if r.get("steering_row", "") is None and r["steered"] is not None:
            setting = "no row"
        else:
            setting = f"{r['alpha']:.2g}" if r.get("mode") != "shift" else f"{r.get('beta'):+.2g}m"
        lines.append(
            f"{str(r['class'])[:8]:>8} {r['n_test']:>4} {len(r['latents']):>4} {setting:>6} | "
            f"{u['accuracy']:>6.3f} {s['accuracy']:>6.3f} | {u['head_usage']:>6.3f} {s['head_usage']:>6.3f} | "
            f"{target_usage(u):>6.3f} {target_usage(s):>6.3f} {drop:>6.1%} | {_kept_text(s):<14}"
        )
    blocks = rows[0].get("steered_blocks") if rows else None
    where = f"the steered (SAE) block(s) {blocks}" if blocks else "the last gated block (no SAE)"
    lines.append(f"(* = steered; block = head usage at {where}; drop = its relative fall; "
                 "no row = the steering table has no row for the class: unsteered)")
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--data", default="digits", help="digits, cifar100:PATH or imagefolder:PATH")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=None,
                        help="data split seed; default: the one the bundle records (it was trained with). "
                             "Only needed for bundles that record none; another seed than the recorded one "
                             "is refused (its test split would hold training images)")
    parser.add_argument("--steer", default=None,
                        help="per-class (each image by its own class's row), a class name, or none; "
                             "default: per-class when the bundle has a steering table, else none")
    parser.add_argument("--random-control", action="store_true", help="also run the random-latent control rows")
    parser.add_argument("--backend", default="compact", help=f"{', '.join(BACKEND_NAMES)} (default compact)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (image-folder loading)")


def _check_json_path(path: Optional[str]) -> None:
    """--json must name a file that can be written: not a folder, inside an existing folder."""
    if not path:
        return
    target = Path(path).resolve()
    if target.is_dir():
        raise InputError(f"--json {path} is a folder; expected a file name (e.g. {Path(path) / 'eval.json'})")
    if not target.parent.is_dir():
        raise InputError(f"--json {path}: the folder {target.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    _check_json_path(args.json)
    engine = Engine.load(args.bundle, backend=args.backend, device=args.device)
    table = engine.info.steering
    if args.steer is None:  # the default: steer per class when there is a table to steer by
        steer = "per-class" if table is not None else None
    else:
        steer = None if args.steer == "none" else args.steer
    if steer is not None and table is None:
        raise InputError(f"--steer {steer}: this bundle has no steering table; use --steer none "
                         "(or train one: headsteer train steering)")
    if steer is not None and steer != "per-class":
        engine.info.steering_row(steer)  # an unknown class, or one without a row: fail before loading data
    if args.random_control and steer is None:
        raise InputError("--random-control compares steering rows with random ones and needs steering: "
                         + ("--steer per-class or a class" if table is not None
                            else "this bundle has no steering table (train one: headsteer train steering)"))
    if args.random_control and not table.info:
        raise InputError("--random-control: this bundle's steering table records no random-latent control rows "
                         "(no per-row info); run without --random-control")
    seed, origin = resolve_split_seed(engine.info.extra, args.seed, "--seed", default=0)
    splits = load_data(args.data, image_size=engine.image_size, seed=seed, progress=not args.no_progress)
    dataset = getattr(splits, args.split)
    print(f"{args.data} {args.split} split ({len(dataset)} images), split seed {seed} ({origin})")
    rows = per_class_table(engine, dataset, steer, random_control=args.random_control)
    print(format_table(rows))
    if steer is not None:
        hit = sum(meets_target(r) for r in rows)
        print(f"{hit} of {len(rows)} classes: usage at the steered block(s) down >= 40% losing <= 1 image")
        unsteered = [r["class"] for r in rows if r["steering_row"] is None]
        if unsteered:
            more = " ..." if len(unsteered) > 20 else ""
            print(f"no steering row (left unsteered): {', '.join(unsteered[:20])}{more}")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0
