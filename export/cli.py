"""`headsteer export BUNDLE --format onnx|tensorrt|triton-repo --out PATH [...]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from headsteer.runtime.errors import InputError

FORMATS = ("onnx", "tensorrt", "triton-repo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from headsteer.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--out", required=True,
        help="onnx: the .onnx file (its steering rows go beside it: model.onnx -> model.steering.json); "
        "tensorrt: the .plan file (likewise, and its description: model.plan -> model.plan.json); "
        "triton-repo: the model repository directory (DIR/<name>/... is written)",
    )
    parser.add_argument(
        "--attention", default="masked", choices=("masked", "sparse"),
        help="masked: all heads computed, pruned ones zeroed, static shapes (default); sparse: only kept heads (data-dependent)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    # (defaults None: an option given for a format it does not apply to is refused, not ignored;
    # `run` fills in the documented defaults)
    parser.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"), help="tensorrt / triton-repo --engine plan (default fp32)")
    parser.add_argument("--min-batch", type=int, default=None, help="TensorRT optimization profile: smallest batch (default 1)")
    parser.add_argument("--opt-batch", type=int, default=None, help="TensorRT optimization profile: batch tuned for (default 8, within min..max)")
    parser.add_argument("--max-batch", type=int, default=None, help="TensorRT profile / Triton max_batch_size (default 32)")
    parser.add_argument("--engine", default=None, choices=("onnx", "plan"), help="triton-repo: serve model.onnx (default) or a TensorRT model.plan")
    parser.add_argument("--name", default=None, help="triton-repo: model name (default: the bundle folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


# Options that apply only to some outputs: (option, attribute in the parsed arguments).
_PLAN_BATCHES = (("--min-batch", "min_batch"), ("--opt-batch", "opt_batch"))
_TRITON_ONLY = (("--engine", "engine"), ("--name", "name"))


def _refuse_inapplicable(args: argparse.Namespace) -> None:
    """InputError naming every option given that the chosen output does not use."""
    if args.format == "onnx":
        options, what = _PLAN_BATCHES + (("--max-batch", "max_batch"),) + _TRITON_ONLY, "--format onnx (batch is dynamic)"
    elif args.format == "tensorrt":
        options, what = _TRITON_ONLY, "--format tensorrt"
    elif args.engine != "plan":
        options, what = _PLAN_BATCHES, "--format triton-repo --engine onnx (they shape a TensorRT plan's profile)"
    else:
        options = ()
    given = [option for option, attribute in options if getattr(args, attribute) is not None]
    if given:
        raise InputError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {what}")


def run(args: argparse.Namespace) -> int:
    from headsteer.runtime.bundle import read_bundle_config

    _refuse_inapplicable(args)
    args.precision = args.precision or "fp32"
    args.min_batch = 1 if args.min_batch is None else args.min_batch
    args.max_batch = 32 if args.max_batch is None else args.max_batch
    args.engine = args.engine or "onnx"
    read_bundle_config(args.bundle)  # a bad bundle fails before anything is exported
    out = Path(args.out)
    from headsteer.export.tensorrt import default_opt_batch  # (importable without tensorrt)

    opt_batch = args.opt_batch if args.opt_batch is not None else default_opt_batch(args.min_batch, args.max_batch)
    if args.format == "onnx":
        from headsteer.export.onnx_export import steering_path_for, to_onnx

        if args.precision != "fp32":
            raise InputError("--precision applies to TensorRT engines; the ONNX contract is float32 (use --format tensorrt)")
        if out.exists() and not args.overwrite:
            raise InputError(f"{out} already exists (pass --overwrite to replace it)")
        # (other steering rows beside it, another model's, are refused without --overwrite)
        path = to_onnx(args.bundle, out, attention=args.attention, opset=args.opset, overwrite=args.overwrite)
        size = path.stat().st_size / 2**20
        print(f"wrote {path} ({args.attention} attention, opset {args.opset}, {size:.1f} MiB) and {steering_path_for(path)}")
    elif args.format == "tensorrt":
        from headsteer.export.onnx_export import steering_path_for
        from headsteer.export.tensorrt import build_engine, plan_description_path

        path = build_engine(
            args.bundle, out, precision=args.precision, min_batch=args.min_batch, opt_batch=opt_batch,
            max_batch=args.max_batch, attention=args.attention, opset=args.opset, overwrite=args.overwrite,
        )
        print(f"wrote {path} ({args.precision}, batch {args.min_batch}/{opt_batch}/{args.max_batch}, {args.attention} attention), "
              f"{plan_description_path(path)} and {steering_path_for(path)}")
    else:
        from headsteer.export.triton_repo import write_triton_repo

        path = write_triton_repo(
            args.bundle, out, name=args.name, engine=args.engine, attention=args.attention, opset=args.opset,
            max_batch_size=args.max_batch, precision=args.precision, overwrite=args.overwrite,
            **(dict(min_batch=args.min_batch, opt_batch=opt_batch) if args.engine == "plan" else {}),
        )
        print(f"wrote Triton model {path.name} in {out} ({'TensorRT plan' if args.engine == 'plan' else 'ONNX'})")
    return 0
