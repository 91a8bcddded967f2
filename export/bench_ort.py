"""ONNX file sizes and ONNX Runtime vs PyTorch latency for both attention variants.

    python -m headsteer.export.bench_ort [--bundle DIR | --model vit_small_patch16_224] [--batches 1 8]

Without --bundle, a randomly initialized GatedViT of `--model` is used (gate biases 0, so about
half the heads are kept). Prints one markdown table: per variant and batch, the median latency
of ONNX Runtime (CPU provider) beside PyTorch's compact and reference backends on the same CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    from headsteer.export.onnx_export import to_onnx
    from headsteer.export.onnx_runner import OrtCallable, build_session
    from headsteer.runtime.gated_vit import GatedViT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    if args.bundle:
        from headsteer.runtime.bundle import load_bundle

        model, _ = load_bundle(args.bundle)
        source, name = args.bundle, Path(args.bundle).name
    else:
        torch.manual_seed(0)
        model = GatedViT.from_timm(args.model, gate_init_bias=0.0).eval()
        source, name = model, f"{args.model} (random weights)"
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        sessions, sizes = {}, {}
        for variant in ("masked", "sparse"):
            path = to_onnx(source, Path(workdir) / f"{variant}.onnx", attention=variant, write_steering=False)
            sizes[variant] = path.stat().st_size / 2**20
            sessions[variant] = OrtCallable(build_session(path, ["CPUExecutionProvider"], threads), model.steer_width)
        for batch in args.batches:
            torch.manual_seed(batch)
            pixels = torch.randn(batch, 3, *model.image_size)
            with torch.inference_mode():
                usage = model(pixels, backend="reference").head_mask.float().mean().item()

            def torch_run(backend):
                with torch.inference_mode():
                    model(pixels, backend=backend)

            compact = _median_ms(lambda: torch_run("compact"), args.warmup, args.iters)
            reference = _median_ms(lambda: torch_run("reference"), args.warmup, args.iters)
            for variant, session in sessions.items():
                ort_ms = _median_ms(lambda: session(pixels), args.warmup, args.iters)
                rows.append((variant, batch, usage, ort_ms, compact, reference))
    print(f"model: {name}; image {model.image_size}; CPU threads {threads}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; onnxruntime {__import__('onnxruntime').__version__}")
    print(f"ONNX file size: masked {sizes['masked']:.1f} MiB, sparse {sizes['sparse']:.1f} MiB")
    print("| variant | batch | head usage | ORT CPU (ms) | torch compact (ms) | torch reference (ms) | ORT / compact |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant, batch, usage, ort_ms, compact, reference in rows:
        print(f"| {variant} | {batch} | {usage:.2f} | {ort_ms:.1f} | {compact:.1f} | {reference:.1f} | {ort_ms / compact:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
