"""ONNX file sizes and ONNX Runtime vs PyTorch latency for both attention variants.

    python -m headsteer.export.bench_ort [--bundle DIR | --model vit_small_patch16_224] [--batches 1 8]

Without --bundle, a randomly initialized GatedViT of `--model` is used (gate biases 0, so about
half the heads are kept). Prints one markdown table: per variant and batch, the median latency
of ONNX Runtime (CPU provider, thread spinning off) beside PyTorch's compact and reference
backends on the same CPU. Every side gets the same steering vectors (the bench harness's
`steering_vectors`: not the identity, so every side computes its SAEs), and the cells of a batch
are timed round-robin, in a freshly shuffled order per repetition, like `headsteer bench`.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from headsteer.runtime.cli import positive_int

DEFAULT_MODEL = "vit_small_patch16_224"


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", default=None, help="bundle directory to time")
    source.add_argument("--model", default=None, help=f"timm model name, random weights (default {DEFAULT_MODEL})")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=_not_negative, default=3, help="untimed calls per cell (default 3)")
    parser.add_argument("--iters", type=positive_int, default=20, help="timed repetitions per cell (default 20)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch and ORT intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.bundle is None and args.model is None:
        args.model = DEFAULT_MODEL
    return args


def time_round_robin(cells: dict, warmup: int, iters: int, seed: int = 0) -> dict:
    """Median milliseconds of each of `cells` (name -> no-argument callable): `warmup` untimed
    calls each, then `iters` repetitions, each calling every cell once in a shuffled order."""
    for fn in cells.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cells}
    order, shuffle = list(cells), random.Random(seed)
    for _ in range(iters):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            cells[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _load(args):
    from headsteer.runtime.gated_vit import GatedViT

    if args.bundle:
        from headsteer.runtime.bundle import load_bundle

        model, _ = load_bundle(args.bundle)
        return model.eval(), args.bundle, Path(args.bundle).name
    torch.manual_seed(0)
    model = GatedViT.from_timm(args.model, gate_init_bias=0.0).eval()
    return model, model, f"{args.model} (random weights)"


def _batch_cells(model, sessions: dict, pixels, steer) -> dict:
    """The timed calls of one batch: both torch backends and each ORT session, same inputs."""

    def torch_run(backend):
        return lambda: model(pixels, *steer, backend=backend)

    cells = {"compact": torch_run("compact"), "reference": torch_run("reference")}
    for variant, session in sessions.items():
        cells[variant] = lambda session=session: session(pixels, *steer)
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        _run(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(args) -> None:
    from headsteer.bench.harness import steering_vectors
    from headsteer.export.onnx_export import to_onnx
    from headsteer.export.onnx_runner import OrtCallable, build_session

    threads = torch.get_num_threads()
    model, source, name = _load(args)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        sessions, sizes = {}, {}
        for variant in ("masked", "sparse"):
            path = to_onnx(source, Path(workdir) / f"{variant}.onnx", attention=variant, write_steering=False)
            sizes[variant] = path.stat().st_size / 2**20
            session = build_session(path, ["CPUExecutionProvider"], threads, allow_spinning=False)
            sessions[variant] = OrtCallable(session, model.steer_width)
        for batch in args.batches:
            torch.manual_seed(batch)
            pixels = torch.randn(batch, 3, *model.image_size)
            steer = steering_vectors(model, batch, "cpu")
            with torch.inference_mode():
                usage = model(pixels, *steer, backend="reference").head_mask.float().mean().item()
                medians = time_round_robin(_batch_cells(model, sessions, pixels, steer), args.warmup, args.iters, seed=batch)
            for variant in sessions:
                rows.append((variant, batch, usage, medians[variant], medians["compact"], medians["reference"]))
    print(f"model: {name}; image {model.image_size}; CPU threads {threads}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; onnxruntime {__import__('onnxruntime').__version__} "
          "(thread spinning off); steering: the bench's (every SAE computed); timed round-robin")
    print(f"ONNX file size: masked {sizes['masked']:.1f} MiB, sparse {sizes['sparse']:.1f} MiB")
    print("| variant | batch | head usage | ORT CPU (ms) | torch compact (ms) | torch reference (ms) | ORT / compact |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant, batch, usage, ort_ms, compact, reference in rows:
        print(f"| {variant} | {batch} | {usage:.2f} | {ort_ms:.1f} | {compact:.1f} | {reference:.1f} | {ort_ms / compact:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
