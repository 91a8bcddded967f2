"""The `headsteer` command. Each subcommand lives beside the code it drives and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only mounts them and turns headsteer's
errors into one-line messages with a non-zero exit status."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Optional, Sequence

from headsteer.runtime.errors import HeadsteerError

# (subcommand, module providing add_arguments/run, one-line help)
SUBCOMMANDS = [
    ("info", "headsteer.runtime.cli", "describe a bundle: architecture, gates, SAE sites, classes, steering table"),
    ("predict", "headsteer.runtime.cli", "classify image files with a bundle, optionally steered toward a class"),
    ("demo", "headsteer.runtime.demo", "train, steer, save and report a pruned model on the embedded digits data"),
    ("train", "headsteer.runtime.train", "run one training recipe (backbone, gates, sae, steering) on a bundle"),
    ("eval", "headsteer.runtime.evaluate", "per-class accuracy and head usage of a bundle on a data split"),
    ("export", "headsteer.export.cli", "export a bundle to ONNX, a TensorRT engine or a Triton model repository"),
    ("bench", "headsteer.bench.harness", "latency/throughput of every backend against timm dense"),
]


# -- info -----------------------------------------------------------------------------------------
def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--json", action="store_true", help="print the bundle's configuration as JSON")


def run_info(args: argparse.Namespace) -> int:
    from headsteer.runtime.bundle import read_bundle_config

    config = read_bundle_config(args.bundle)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    model = config["model"]
    sites = ", ".join(f"block {s['block']} ({s['width']} latents, {s['activation']})" for s in config.get("sae_sites", []))
    steering = config.get("steering")
    names = config["class_names"]
    lines = [
        f"bundle        {args.bundle} (format version {config['format_version']})",
        f"architecture  timm {model['timm_name']} {json.dumps(model['timm_kwargs'])}",
        f"input         {config.get('in_chans', 3)}x{config['image_size'][0]}x{config['image_size'][1]}, "
        f"mean {config['normalization']['mean']}, std {config['normalization']['std']}",
        f"heads         {config.get('num_heads')} per block; gated blocks {config.get('gated_blocks')}",
        f"SAE sites     {sites or 'none'}; steer width {config['steer_width']}; mode {model.get('steer_mode')}",
        f"classes       {len(names)}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}",
        "steering      "
        + (f"{len(steering['classes'])} per-class rows ({', '.join(steering['classes'][:20])})" if steering else "none"),
    ]
    print("\n".join(lines))
    return 0


# -- predict --------------------------------------------------------------------------------------
def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--steer", default=None, help="class name to steer toward (from the bundle's steering table)")
    from headsteer.runtime.engine import BACKEND_NAMES

    parser.add_argument("--backend", default="auto", help=", ".join(BACKEND_NAMES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per forward pass (default 32): bounds memory however many files are given")


def positive_int(text: str) -> int:
    """argparse type: a positive integer (the commands' counts and sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _read_rgb(name: str, keep: bool = True):
    """The image file `name` decoded as RGB, or an InputError naming the file. With keep=False it
    is decoded (PIL's verify checks data only for PNG: a corrupt JPEG shows only when decoded)
    and dropped, to check every file before any work without holding them all in memory."""
    from PIL import Image, UnidentifiedImageError

    from headsteer.runtime.engine import wide_mode_problem
    from headsteer.runtime.errors import InputError

    try:
        with Image.open(name) as image:
            problem = wide_mode_problem(image, f"image {name}", tensor_hint=False)
            if problem:
                raise InputError(problem)
            if not keep:
                image.load()
                return None
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image file {name} does not exist") from None
    # (PIL reports a PNG chunk with a bad checksum as a SyntaxError)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise InputError(f"cannot read image {name}: {error}") from None


def run_predict(args: argparse.Namespace) -> int:
    from headsteer.runtime.engine import Engine, check_backend_name, parse_device

    check_backend_name(args.backend)  # (Engine.load checks both again; here before any image is read)
    parse_device(args.device)
    # Decode every file before loading the model, so bad input fails before any work, but keep
    # none: each batch below decodes its own files again, so memory holds one batch of images.
    for name in args.images:
        _read_rgb(name, keep=False)
    engine = Engine.load(args.bundle, backend=args.backend, device=args.device)
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start:start + args.batch_size]
        result = engine.predict([_read_rgb(name) for name in names], steer=args.steer)
        for index, name in enumerate(names):
            probabilities = result.logits[index].softmax(-1)
            row = dict(
                image=name,
                label=result.class_names[index],
                probability=round(float(probabilities.max()), 4),
                head_usage=round(float(result.head_usage[index]), 4),
                steer=args.steer,
            )
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{name}: {row['label']} (p={row['probability']:.3f}, head usage {row['head_usage']:.3f})",
                      flush=True)
    return 0


def _mount(subparsers, name: str, module_name: str, help_text: str) -> None:
    if module_name == "headsteer.runtime.cli":  # this module (also when run as __main__)
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        {"info": add_info_arguments, "predict": add_predict_arguments}[name](parser)
        parser.set_defaults(handler={"info": run_info, "predict": run_predict}[name])
        return
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return  # that part of headsteer is not installed in this build
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headsteer",
        description="Vision Transformers with per-input head pruning, steered through a Sparse Autoencoder.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        _mount(subparsers, name, module_name, help_text)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:  # (mounting the subcommands imports torch, timm, onnx...: seconds a Ctrl-C can land in)
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("headsteer: interrupted", file=sys.stderr)
        return 130
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except HeadsteerError as error:
        print(f"headsteer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headsteer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

