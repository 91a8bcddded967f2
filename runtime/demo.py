"""`headsteer demo --out DIR [--quick]`: from nothing to a steered, pruned, saved model on the
embedded digits data, with a report measured through `Engine` on the test split.

Stages (every one a recipe of `headsteer.runtime.train`, every bundle kept under DIR/stages/):
dense backbone -> head gates (every block) -> SAE on the last block + per-class steering
(DIR/bundle/, the paper's setting) and, beyond the paper, SAEs ahead of every gate + per-class
steering of the whole network (DIR/bundle_all/). Then report.json, report.md and plots.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from headsteer.runtime import train as T
from headsteer.runtime.data import data_record, load_data
from headsteer.runtime.engine import Engine
from headsteer.runtime.errors import InputError
from headsteer.runtime.files import write_text_atomic
from headsteer.runtime.evaluate import (
    format_table,
    measure_latency,
    meets_target,
    per_class_table,
    strategies_summary,
)
from headsteer.runtime.steering import SteeringConfig, fit_steering


@dataclass
class DemoSettings:
    """Everything the demo trains with. `full()` is the default run, `quick()` the CI one."""

    data: str = "digits"
    image_size: int = 16
    timm_kwargs: dict = field(default_factory=T.digits_vit_kwargs)
    backbone: T.BackboneConfig = field(default_factory=lambda: T.BackboneConfig(epochs=80))
    gates: T.GateConfig = field(default_factory=lambda: T.GateConfig(epochs=30))
    sae: T.SAEConfig = field(default_factory=lambda: T.SAEConfig(epochs=300))
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    whole_network: bool = True
    latency_repeats: int = 7
    seed: int = 0
    preset: str = "full"  # "full" or "quick", recorded in the report

    @classmethod
    def full(cls, seed: int = 0) -> "DemoSettings":
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoSettings":
        return cls(
            backbone=T.BackboneConfig(epochs=25),
            gates=T.GateConfig(epochs=10),
            sae=T.SAEConfig(epochs=80),
            steering=SteeringConfig(counts=(4, 16), alphas=(0.0, 0.5, 4.0), betas=(-1.0, 1.0),
                                    global_alphas=(0.0, 0.5, 4.0), topk_ks=(4,), topk_alphas=(0.0, 4.0)),
            latency_repeats=3,
            seed=seed,
            preset="quick",
        )

    def seeded(self) -> "DemoSettings":
        for part in (self.backbone, self.gates, self.sae, self.steering):
            part.seed = self.seed
        return self


def _rounded(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _setting_report(engine: Engine, dataset, choices: dict, latency_repeats: int) -> dict:
    from headsteer.runtime.steering import global_rows

    alpha = ((choices or {}).get("global_amplification") or {}).get("alpha", 1.0)
    rows = per_class_table(engine, dataset, "per-class", random_control=True,
                           others=dict(global_amplification=global_rows(len(dataset), engine.steer_width, alpha)))
    strategies = strategies_summary(engine, dataset, choices)
    latency = measure_latency(engine, dataset, repeats=latency_repeats) if latency_repeats > 0 else None
    return dict(
        sae_blocks=list(engine.model.sae_blocks),
        strategies=strategies,
        per_class=rows,
        classes_meeting_target=dict(
            per_class=sum(meets_target(r, "steered") for r in rows),
            random_latents=sum(meets_target(r, "random") for r in rows),
            global_amplification=sum(meets_target(r, "global_amplification") for r in rows),
            of=len(rows),
        ),
        latency=latency,
    )


def bundle_paths(out: Path, settings: DemoSettings) -> list[Path]:
    """Every bundle the demo writes (and replaces) under `out`."""
    paths = [out / "stages" / "backbone", out / "stages" / "gates", out / "bundle"]
    return paths + [out / "bundle_all"] if settings.whole_network else paths


def report_paths(out: Path, settings: DemoSettings) -> list[Path]:
    """Every report file the demo writes (and replaces) under `out`."""
    from headsteer.runtime.plots import plot_paths

    return [out / "report.json", out / "report.md", *plot_paths(out, settings.whole_network)]


def check_out(out: Path, settings: DemoSettings) -> None:
    """Refuse an output folder the demo cannot use, before any work: `out` must be a folder (or
    new), each bundle path in it new, empty or a bundle, so no other folder is ever replaced, and
    no report file a folder (it could not be written after all the training)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    for path in bundle_paths(out, settings):
        T.check_bundle_out(path, f"--out {out}: bundle folder")
    for path in report_paths(out, settings):
        if path.is_dir():
            raise InputError(f"--out {out}: {path.name} is a folder, where the demo writes a report file; "
                             "move it, or give another --out")


def run_demo(out: Path, settings: DemoSettings, progress: bool = True, log=print) -> dict:
    """Train everything, save bundles, measure on test through Engine, write the report; returns
    the report dict."""
    settings = settings.seeded()
    start = time.perf_counter()
    out = Path(out)
    check_out(out, settings)
    stages_dir = out / "stages"
    timings = {}

    def lap(name, t0):
        timings[name] = round(time.perf_counter() - t0, 2)
        log(f"[{time.perf_counter() - start:6.1f}s] {name} done ({timings[name]:.1f}s)")

    splits = load_data(settings.data, image_size=settings.image_size, seed=settings.seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)  # after the data (and its seed) are checked
    data = data_record(settings.data, settings.seed)  # one seed splits the data and seeds training
    kwargs = dict(settings.timm_kwargs, img_size=settings.image_size, num_classes=len(splits.class_names))

    t0 = time.perf_counter()
    model = T.new_backbone(T.DEFAULT_TIMM_NAME, kwargs, seed=settings.seed)
    model, stage = T.train_backbone(model, splits, settings.backbone, progress)
    # A rerun replaces the bundles one by one from here: an earlier run's reports (of either
    # setting) would describe bundles that are gone if this run stopped before writing its own.
    for path in report_paths(out, replace(settings, whole_network=True)):  # (every report path of both)
        if path.is_file() or path.is_symlink():
            path.unlink()
    T.save_stage(model, stages_dir / "backbone", splits, T._json_safe(dict(T._record({}, stage), data=data)))
    lap("backbone", t0)

    t0 = time.perf_counter()
    gated = T.add_gates(model)
    gated, gate_stage = T.train_gates(gated, splits, settings.gates, progress)
    extra = dict(T._record(T._record({}, stage), gate_stage), data=data)
    T.save_stage(gated, stages_dir / "gates", splits, T._json_safe(extra))
    lap("gates", t0)

    settings_list = [("last_block", (-1,), out / "bundle")]
    if settings.whole_network:
        settings_list.append(("whole_network", "all", out / "bundle_all"))
    sae_reports, choices = {}, {}
    for name, blocks, path in settings_list:
        t0 = time.perf_counter()
        with_sae, sae_stage = T.train_sae(gated, splits, blocks, settings.sae, progress)
        table, steer_stage = fit_steering(with_sae, splits, settings.steering, progress)
        T.save_stage(with_sae, path, splits, T._json_safe(T._record(T._record(extra, sae_stage), steer_stage)),
                     steering=table)
        sae_reports[name] = sae_stage
        choices[name] = steer_stage
        lap(f"sae + steering ({name})", t0)

    # -- everything below is measured on the test split through Engine (compact backend) --------
    t0 = time.perf_counter()
    test = splits.test
    dense_engine = Engine.load(stages_dir / "backbone", backend="compact")
    from headsteer.runtime.evaluate import run_engine, summarize

    dense = summarize(*run_engine(dense_engine, test.images), test.labels)
    results = {}
    for name, _, path in settings_list:
        engine = Engine.load(path, backend="compact")
        results[name] = _setting_report(engine, test, choices[name], settings.latency_repeats)
    lap("evaluation (test, Engine compact)", t0)

    main = results["last_block"]
    none = main["strategies"]["none"]
    sae_main = sae_reports["last_block"]["val"]
    report = dict(
        data=dict(spec=settings.data, image_size=settings.image_size, train=len(splits.train), val=len(splits.val),
                  test=len(test), split_seed=settings.seed),
        model=dict(timm_name=T.DEFAULT_TIMM_NAME, timm_kwargs=kwargs, heads=gated.num_heads,
                   gated_blocks=gated.gate_blocks),
        dense_backbone=dict(test_accuracy=dense["accuracy"]),
        baseline=dict(test_accuracy=none["test_accuracy"], head_usage=none["head_usage"],
                      final_block_usage=none["final_block_usage"]),
        sae=dict(fve=sae_main["fve"], l0=sae_main["l0"], dead_fraction=sae_main["dead_fraction"],
                 block=list(sae_reports["last_block"]["sae_blocks"])),
        strategies=main["strategies"],
        per_class=main["per_class"],
        classes_meeting_target=main["classes_meeting_target"],
        latency=main["latency"],
        selection=dict(
            objective=choices["last_block"]["objective"],
            global_amplification=choices["last_block"]["global_amplification"],
            topk_amplification=choices["last_block"]["topk_amplification"],
        ),
        settings=dict(quick=settings.preset == "quick", **_settings_dict(settings)),
        timings_s=timings,
    )
    if "whole_network" in results:
        whole = results["whole_network"]
        report["whole_network"] = dict(
            sae={k: dict(v) for k, v in sae_reports["whole_network"]["sites"].items()},
            sae_mean=sae_reports["whole_network"]["val"],
            strategies=whole["strategies"],
            per_class=whole["per_class"],
            classes_meeting_target=whole["classes_meeting_target"],
            latency=whole["latency"],
            selection=dict(
                global_amplification=choices["whole_network"]["global_amplification"],
                topk_amplification=choices["whole_network"]["topk_amplification"],
            ),
        )
    timings["total"] = round(time.perf_counter() - start, 2)
    report = _rounded(T._json_safe(report))
    markdown = report_markdown(report)  # rendered before any report file is written
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    from headsteer.runtime.plots import write_plots

    write_plots(report, out)
    write_text_atomic(out / "report.md", markdown)
    return report


def _settings_dict(settings: DemoSettings) -> dict:
    return dict(
        backbone=asdict(settings.backbone), gates=asdict(settings.gates), sae=asdict(settings.sae),
        steering=asdict(settings.steering), seed=settings.seed, threads=torch.get_num_threads(),
    )


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# What `evaluate.strategies_summary` measured per strategy; its other keys are the chosen setting.
MEASURED_KEYS = ("test_accuracy", "head_usage", "steered_block_usage", "final_block_usage")


def _strategy_md(strategies: dict) -> list[str]:
    lines = ["| strategy | setting (chosen on val) | test accuracy | head usage | final-block usage |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, s in strategies.items():
        setting = ", ".join(f"{k}={v}" for k, v in s.items() if k not in MEASURED_KEYS)
        lines.append(f"| {name} | {setting or '-'} | {_pct(s['test_accuracy'])} | {s['head_usage']:.3f} | "
                     f"{s['final_block_usage']:.3f} |")
    return lines


def _per_class_md(rows: list, whole: bool) -> list[str]:
    usage_key = "head_usage" if whole else "final_block_usage"
    label = "whole-model usage" if whole else "final-block usage"
    lines = [f"| class | n | latents | setting | accuracy (unsteered -> steered) | {label} | drop | kept heads* "
             "| random control: accuracy, " + label + " | global strategy: accuracy, " + label + " |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | --- | --- | --- |"]
    for r in rows:
        u, s, rnd, glb = r["unsteered"], r["steered"], r.get("random") or {}, r.get("global_amplification") or {}
        drop = (u[usage_key] - s[usage_key]) / u[usage_key] if u[usage_key] else 0.0
        setting = f"alpha={r['alpha']}" if r.get("mode") != "shift" else f"shift {r.get('beta')}x class mean"
        lines.append(
            f"| {r['class']} | {r['n_test']} | {len(r['latents'])} | {setting} | "
            f"{u['correct']}/{r['n_test']} -> {s['correct']}/{r['n_test']} | {u[usage_key]:.3f} -> {s[usage_key]:.3f} | "
            f"{drop:.0%} | {s['kept_heads']} | {rnd.get('correct', '-')}/{r['n_test']}, {rnd.get(usage_key, float('nan')):.3f} | "
            f"{glb.get('correct', '-')}/{r['n_test']}, {glb.get(usage_key, float('nan')):.3f} |"
        )
    return lines


def report_markdown(report: dict) -> str:
    b, sae = report["baseline"], report["sae"]
    t = report["classes_meeting_target"]
    lines = [
        "# headsteer demo report",
        "",
        f"Data: {report['data']['spec']} ({report['data']['train']}/{report['data']['val']}/{report['data']['test']} "
        f"train/val/test, split seed {report['data']['split_seed']}), {report['data']['image_size']}px. "
        f"Model: timm {report['model']['timm_name']} {json.dumps(report['model']['timm_kwargs'])}, "
        f"{report['model']['heads']} heads per block, gates on blocks {report['model']['gated_blocks']}.",
        "Every number below is measured on the **test** split through `Engine` (compact backend); "
        "latents, counts and alphas were chosen on the validation split only.",
        "",
        "## Baseline",
        "",
        f"- dense backbone test accuracy: {_pct(report['dense_backbone']['test_accuracy'])}",
        f"- gated model (unsteered) test accuracy: {_pct(b['test_accuracy'])}, head usage {b['head_usage']:.3f}, "
        f"final-block usage {b['final_block_usage']:.3f}",
        f"- SAE on block {sae['block']} (val): FVE {_num(sae['fve'])}, L0 {_num(sae['l0'], 1)}, "
        f"dead latents {_pct(sae['dead_fraction'])}",
        "",
        "## Strategies (SAE on the last block: the paper's setting)",
        "",
        *_strategy_md(report["strategies"]),
        "",
        "per_class and random_latents steer each test image with its own class's row (oracle class, "
        "as in the paper's per-class analysis).",
        "",
        "## Per-class steering (last block)",
        "",
        *_per_class_md(report["per_class"], whole=False),
        "",
        "\\* heads of the final block kept by a majority of the class's steered test images.",
        "",
        f"Target (final-block usage down >= 40%, at most one test image lost): **{t['per_class']} of {t['of']}** "
        f"classes with per-class steering; {t['random_latents']} of {t['of']} with the random-latent control; "
        f"{t.get('global_amplification', 'n/a')} of {t['of']} with the global strategy (the val-chosen alpha applied "
        "to every latent of every image, no class information).",
    ]
    if report.get("latency"):
        lat = report["latency"]
        lines += ["", f"Latency ({lat['backend']}, {lat['threads']} thread(s), median of {lat['repeats']}): "
                  f"unsteered {lat['unsteered_ms_per_image']:.3f} ms/image, per-class steered "
                  f"{lat['steered_ms_per_image']:.3f} ms/image (speed-up x{lat['speedup']:.2f})."]
    whole = report.get("whole_network")
    if whole:
        tw = whole["classes_meeting_target"]
        sm = whole["sae_mean"]
        varying = sum(v["fve"] is not None for v in whole["sae"].values())
        lines += [
            "",
            "## Beyond the paper: an SAE ahead of every gate (whole-network steering)",
            "",
            f"SAEs (val): FVE {_num(sm['fve'])} (mean over the {varying} site(s) with a varying input), "
            f"L0 {_num(sm['l0'], 1)}, dead {_pct(sm['dead_fraction'])} (means over all {len(whole['sae'])} sites); "
            "per site: " + ", ".join(
                f"block {b}: FVE {_num(v['fve'])}" for b, v in whole["sae"].items()
            ) + " (block 0 sees the class token before any attention: the same vector for every image). "
            "Per-class rows steer every site; the objective lowers whole-model head usage.",
            "",
            *_strategy_md(whole["strategies"]),
            "",
            *_per_class_md(whole["per_class"], whole=True),
            "",
            "Target as above, judged on the steered blocks' usage (here every gated block: whole-model head "
            f"usage): {tw['per_class']} of {tw['of']} classes "
            f"(random control {tw['random_latents']}, global strategy {tw.get('global_amplification', 'n/a')}).",
        ]
        if whole.get("latency"):
            lat = whole["latency"]
            lines += ["", f"Latency ({lat['backend']}, {lat['threads']} thread(s), median of {lat['repeats']}): "
                      f"unsteered {lat['unsteered_ms_per_image']:.3f} ms/image, per-class steered "
                      f"{lat['steered_ms_per_image']:.3f} ms/image (speed-up x{lat['speedup']:.2f})."]
        lines += ["", "## Side by side (per-class steering, test)", "",
                  "| setting | accuracy | head usage | final-block usage | classes meeting target (steered-block usage) "
                  "| latency steered/unsteered |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, part in (("last block (paper)", report), ("every block", whole)):
            s, n = part["strategies"]["per_class"], part["strategies"]["none"]
            lat = part.get("latency")
            ratio = f"{lat['steered_ms_per_image'] / lat['unsteered_ms_per_image']:.2f}" if lat else "-"
            lines.append(f"| {name} | {_pct(n['test_accuracy'])} -> {_pct(s['test_accuracy'])} | "
                         f"{n['head_usage']:.3f} -> {s['head_usage']:.3f} | {n['final_block_usage']:.3f} -> "
                         f"{s['final_block_usage']:.3f} | {part['classes_meeting_target']['per_class']} | {ratio} |")
    lines += ["", f"Wall time: {report['timings_s'].get('total', 0):.0f} s ({json.dumps(report['timings_s'])}).", ""]
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="output directory (bundles, report.json, report.md, plots); its bundle folders "
                             "(stages/backbone, stages/gates, bundle, bundle_all) are replaced only if bundles or empty")
    parser.add_argument("--quick", action="store_true", help="a short run (CI, impatient users): same outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small models run fastest single-threaded)")
    parser.add_argument("--no-whole-network", action="store_true", help="skip the SAE-on-every-block setting")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    settings = DemoSettings.quick(args.seed) if args.quick else DemoSettings.full(args.seed)
    settings.whole_network = not args.no_whole_network
    check_out(out, settings)
    torch.set_num_threads(args.threads)
    report = run_demo(out, settings, progress=not args.no_progress)
    print()
    print("Per-class steering, last block (test split, Engine compact):")
    print(format_table(report["per_class"]))
    b = report["baseline"]
    print(f"dense backbone accuracy {report['dense_backbone']['test_accuracy']:.4f}; gated accuracy "
          f"{b['test_accuracy']:.4f}, head usage {b['head_usage']:.3f}, final block {b['final_block_usage']:.3f}")
    t = report["classes_meeting_target"]
    print(f"classes meeting the target: per-class {t['per_class']}/{t['of']}, random control {t['random_latents']}/{t['of']}, "
          f"global strategy {t['global_amplification']}/{t['of']}")
    if "whole_network" in report:
        print("\nWhole-network steering (SAE ahead of every gate):")
        print(format_table(report["whole_network"]["per_class"]))
        lat = report["whole_network"].get("latency")
        if lat:
            print(f"latency: unsteered {lat['unsteered_ms_per_image']:.3f} ms/img, steered "
                  f"{lat['steered_ms_per_image']:.3f} ms/img (x{lat['speedup']:.2f})")
    print(f"\nwrote {out}/bundle, {out}/report.json, {out}/report.md and plots in {report['timings_s']['total']:.0f} s")
    return 0
