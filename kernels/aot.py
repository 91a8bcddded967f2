"""Compile the Triton kernels for a CUDA GPU on a machine that has none.

Triton's CPU interpreter (TRITON_INTERPRET=1, which the tests use without a GPU) runs a kernel's
math but accepts programs the GPU compiler rejects (a loop-carried variable whose shape changes,
a dot the MMA lowering refuses) and cannot tell whether a kernel spills registers. `compile_only`
swaps Triton's active driver for one that only names a target (sm_90 by default), so calling the
real wrapper functions on CPU tensors compiles each launch for that GPU instead of running it;
`ptxas -v` then reports registers, spills and shared memory of every compiled kernel.

    python -m headsteer.kernels.aot [--arch 90] [--quick] [--only NAME] [--json FILE] [--ptx DIR]

compiles the kernels at the shapes `headsteer.bench.kernels` times (ViT-S and ViT-B, bf16) plus
fp32 and q/k-norm variants and prints one line per kernel. Run it without TRITON_INTERPRET: a
kernel is interpreted or compiled from the moment its module is imported.

`--ptx DIR` also writes each launch's PTX without its debug information (`normalized_ptx`), one
file per variant and kernel, so that two checkouts' directories can be compared with `diff -r`:
a refactor that claims to leave the compiled kernels alone can show it instruction for
instruction.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

_COMPILE_ONLY_ARCH: Optional[int] = None


def targets_cuda(device: torch.device) -> bool:
    """Whether kernels launched for tensors on `device` are compiled for CUDA: CUDA tensors, or
    any tensor inside `compile_only` (which stands in for a GPU)."""
    return device.type == "cuda" or _COMPILE_ONLY_ARCH is not None


def cuda_capability(device: torch.device) -> Optional[int]:
    """Compute capability (e.g. 90 for an H100) that kernels launched for tensors on `device` are
    compiled for: the `compile_only` target, the CUDA device's, or None (the CPU interpreter)."""
    if _COMPILE_ONLY_ARCH is not None:
        return _COMPILE_ONLY_ARCH
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def check_devices(device: torch.device, *groups) -> None:
    """Refuse, before any launch, tensors that are not on `device`: kernels read raw pointers, so one
    on another device would fault the GPU or read the wrong memory instead of raising. Each group is
    a dict of name -> value, or a (label, dict) pair whose names the label prefixes in the message
    (e.g. a gate's parameter dict as it is); values that are not tensors are skipped, and names are
    put together only when something is refused (this runs on every eager launch)."""
    labelled = [group if isinstance(group, tuple) else ("", group) for group in groups]
    for _, named in labelled:
        for tensor in named.values():
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                elsewhere = [f"{label}{name} on {value.device}" for label, others in labelled
                             for name, value in others.items()
                             if isinstance(value, torch.Tensor) and value.device != device]
                raise ValueError(f"every tensor must be on {device} like the input; got {', '.join(elsewhere)}")


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch kernels for tensors on `device` in: Triton launches on the current
    CUDA device's stream, so a CUDA device other than the current one is made current for the
    launches (as torch's own ops do); anything else needs nothing."""
    if device.type == "cuda" and _COMPILE_ONLY_ARCH is None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def fp32_dot_precision(device: torch.device) -> str:
    """How Triton dots multiply fp32 inputs: as 3xTF32 on CUDA tensor cores (fp32-level accuracy,
    unlike plain TF32; exact fp32 FMA dots of the tile sizes used here spill registers by the
    kilobyte on sm_90, see `python -m headsteer.kernels.aot`), exactly elsewhere (Triton's CPU
    interpreter multiplies in numpy fp32 whatever is asked)."""
    return "tf32x3" if targets_cuda(device) else "ieee"


@dataclass
class CompiledKernel:
    """One compiled launch: the kernel, the variant that launched it, and ptxas's resource report."""

    variant: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    # launched with programmatic dependent launch, and its code waits on the previous launch
    # (griddepcontrol.wait in the PTX) before it reads anything
    programmatic_launch: bool
    cache_key: str  # Triton's hash of the compiled source, specialization and options: equal keys, one compile


class _CompileOnlyDriver:
    """The part of Triton's driver interface that compiling needs: a target, a device, a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list]:
    """Within the block, every Triton launch compiles for sm_<arch> and returns without running;
    yields the list that collects (JITFunction, compiled kernel) pairs in launch order."""
    global _COMPILE_ONLY_ARCH
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset (interpreted kernels never compile)")
    import triton
    from triton.runtime.jit import JITFunction

    compiled: list = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self, kernel))
        return kernel

    driver = triton.runtime.driver
    previous = driver._active  # None until a real driver was needed; reset_active() would create one
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    _COMPILE_ONLY_ARCH = arch
    try:
        yield compiled
    finally:
        _COMPILE_ONLY_ARCH = None
        JITFunction.run = original_run
        driver._active = previous


def ptxas_report(kernel, arch: int) -> dict:
    """Registers, spills and stack of a compiled kernel, from `ptxas -v` on its PTX."""
    import triton

    tool = triton.knobs.nvidia.ptxas_blackwell if arch >= 100 else triton.knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        # The flags Triton's own NVIDIA backend passes (triton/backends/nvidia/compiler.py, make_cubin).
        command = [tool.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", ptx,
                   "-o", os.path.join(tmp, "kernel.cubin")]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
    )


def normalized_ptx(ptx: str) -> str:
    """A kernel's PTX without what moves when its source lines move: the DWARF sections, `.loc`
    and `.file` directives, comments and the debug labels Triton numbers."""
    code = ptx.split("\t.section\t.debug")[0]
    lines = (line for line in code.splitlines() if not re.match(r"\s*(\.loc|\.file|//)", line))
    return re.sub(r"\$L__(tmp|func_begin|func_end)\d+", "", "\n".join(lines)) + "\n"


def _variants(quick: bool) -> Iterator[tuple[str, callable]]:
    """(name, thunk) pairs; each thunk calls the real wrappers once on CPU tensors."""
    from headsteer.kernels import triton_head_attention as attention
    from headsteer.kernels.triton_head_attention import triton_head_attention
    from headsteer.kernels.triton_sae_gate import triton_sae_steer_gate

    generator = torch.Generator().manual_seed(0)
    models = {"ViT-S": (6, 384)} if quick else {"ViT-S": (6, 384), "ViT-B": (12, 768)}
    batch, tokens = 64, 197

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator).to(dtype)

    for name, (heads, dim) in models.items():
        for dtype in (torch.bfloat16, torch.float32):
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            x = rand(batch, tokens, dim, dtype=dtype)
            keep = torch.rand(batch, heads, generator=generator) < 0.5
            weights = (rand(3 * dim, dim, dtype=dtype), rand(3 * dim, dtype=dtype), rand(dim, dim, dtype=dtype), rand(dim, dtype=dtype))
            yield f"attention {label}", lambda x=x, keep=keep, w=weights, h=heads: triton_head_attention(x, keep, *w, h)
            if dtype != torch.float32:  # (fp32 launches use TILES_FP32, not TILES)
                # Opt-in variants the benchmark sweep times: the projection's per-head branch, q|k
                # as one QKV dot, 128-token QKV tiles with 64-row narrow passes, the attention's
                # narrow passes over the ragged ends, programmatic dependent launches.
                for variant, overrides in (("head-branch", dict(proj_kept_list_max_heads=0)),
                                           ("kept-list", dict(proj_kept_list_max_heads=16)),
                                           ("row-bits", dict(proj_kept_list_max_heads=16, proj_list_row_bits=True)),
                                           ("row-bits-wide", dict(proj_kept_list_max_heads=16, proj_list_row_bits=True,
                                                                  proj_block_t=128, proj_block_o=256, proj_warps=8)),
                                           ("fused-qk", dict(qkv_fuse_qk=True)),
                                           ("qkv-narrow", dict(qkv_block_n=128, qkv_warps=8, qkv_narrow_n=64)),
                                           ("narrow-tails", attention.NARROW_TAIL_TILES),
                                           ("programmatic-launch", dict(programmatic_launch=True))):

                    def with_tiles(x=x, keep=keep, w=weights, h=heads, tiles=dataclasses.replace(attention.TILES, **overrides)):
                        with attention.tile_config(tiles):
                            triton_head_attention(x, keep, *w, h)

                    yield f"attention {label} {variant}", with_tiles
                # The whole-block update of the model path: residual and LayerScale in the epilogue.
                yield f"attention {label} residual", lambda x=x, keep=keep, w=weights, h=heads: triton_head_attention(
                    x, keep, *w, h, residual=x, layer_scale=w[3])
                for rows in (1, 7):  # other batch sizes: the same attention and projection kernels
                    yield f"attention {label} batch {rows}", lambda x=x, keep=keep, w=weights, h=heads, rows=rows: (
                        triton_head_attention(x[:rows], keep[:rows], *w, h))
            if not quick:
                norms = [torch.nn.LayerNorm(dim // heads).to(dtype) for _ in range(2)]
                yield f"attention {label} qk-norm", lambda x=x, keep=keep, w=weights, h=heads, n=norms: triton_head_attention(
                    x, keep, *w, h, q_norm=n[0], k_norm=n[1])

        wide_heads = dim // 128  # d=128: the widest head rows, where shared memory runs out first
        x = rand(batch, tokens, dim, dtype=torch.float32)
        keep = torch.rand(batch, wide_heads, generator=generator) < 0.5
        weights = tuple(rand(*shape, dtype=torch.float32) for shape in ((3 * dim, dim), (3 * dim,), (dim, dim), (dim,)))
        yield f"attention {name} float32 d=128", lambda x=x, keep=keep, w=weights, h=wide_heads: triton_head_attention(x, keep, *w, h)

        gate = dict(norm_weight=rand(dim), norm_bias=rand(dim), norm_eps=1e-6, fc1_weight=rand(dim // 4, dim),
                    fc1_bias=rand(dim // 4), fc2_weight=rand(heads, dim // 4), fc2_bias=rand(heads))
        width = 4 * dim
        e = rand(batch, dim)
        scale, shift = rand(batch, width), rand(batch, width)
        for activation in ("topk",) if quick else ("topk", "relu"):
            sae = dict(enc_weight=rand(width, dim), enc_bias=rand(width), dec_weight=rand(width, dim), dec_bias=rand(dim),
                       threshold=None, activation=activation, k=16)
            yield f"gate {name} {activation} scale+shift", lambda e=e, g=gate, s=sae: triton_sae_steer_gate(e, g, s, scale, shift)
            if activation == "topk":
                for rows in (1, 7):  # the same launch at other batch sizes: the same kernel, no new compile
                    yield f"gate {name} topk scale+shift batch {rows}", lambda e=e, g=gate, s=sae, rows=rows: (
                        triton_sae_steer_gate(e[:rows], g, s, scale[:rows], shift[:rows]))
            if activation == "topk" and not quick:
                yield f"gate {name} topk scale", lambda e=e, g=gate, s=sae: triton_sae_steer_gate(e, g, s, scale, None, budget=0.5)
                yield f"gate {name} topk reconstruct", lambda e=e, g=gate, s=sae: triton_sae_steer_gate(
                    e, g, s, None, None, mode="reconstruct")
        yield f"gate {name} no SAE", lambda e=e, g=gate: triton_sae_steer_gate(e, g)
        yield f"gate {name} no SAE budget", lambda e=e, g=gate: triton_sae_steer_gate(e, g, budget=0.5)


def compile_all(arch: int = 90, quick: bool = False, only: str = "", ptx_dir: Optional[str] = None) -> list[CompiledKernel]:
    """Compile every variant (whose name contains `only`) for sm_<arch>; one entry per kernel launch.
    With `ptx_dir`, each launch's `normalized_ptx` goes to <ptx_dir>/<variant>/<launch>_<kernel>.ptx."""
    # (imported here: headsteer.runtime imports the model, whose kernels import this module)
    from headsteer.runtime.files import write_text_atomic

    results = []
    for variant, thunk in _variants(quick):
        if only not in variant:
            continue
        with compile_only(arch) as compiled:
            thunk()
        for launch, (function, kernel) in enumerate(compiled):
            ptx = kernel.asm["ptx"]
            if ptx_dir is not None:
                folder = os.path.join(ptx_dir, re.sub(r"[^\w.=+-]", "_", variant))
                write_text_atomic(os.path.join(folder, f"{launch}_{function.__name__}.ptx"), normalized_ptx(ptx))
            report = ptxas_report(kernel, arch)
            results.append(CompiledKernel(
                variant=variant, kernel=function.__name__, shared_bytes=kernel.metadata.shared,
                num_warps=kernel.metadata.num_warps, cache_key=kernel.hash, **report,
                programmatic_launch=bool(kernel.metadata.launch_pdl) and "griddepcontrol.wait" in ptx,
            ))
    return results


# Compute capabilities of NVIDIA GPUs that --arch accepts. Another number is no GPU: LLVM aborts
# the process on it (e.g. 91: "LLVM ERROR: Cannot select"), or ptxas rejects the sm_ name.
KNOWN_ARCHS = (70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    parser.add_argument("--quick", action="store_true", help="ViT-S only, fewer attention and gate variants")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this, e.g. 'gate'")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--ptx", metavar="DIR", help="also write each launch's PTX, debug information stripped, "
                                                     "under DIR (compare two checkouts with diff -r)")
    args = parser.parse_args(argv)
    if args.arch not in KNOWN_ARCHS:
        print(f"headsteer.kernels.aot: --arch {args.arch} is not a GPU compute capability; expected one of "
              f"{', '.join(map(str, KNOWN_ARCHS))}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("headsteer.kernels.aot: unset TRITON_INTERPRET; interpreted kernels are never compiled", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("headsteer.kernels.aot: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from headsteer.runtime.errors import HeadsteerError
    from headsteer.runtime.files import check_can_create

    try:  # (the report is written after minutes of compiling: refuse a path it cannot go to first)
        if args.json is not None:
            if os.path.isdir(args.json):
                raise HeadsteerError(f"--json {args.json} is a folder; expected a file name")
            check_can_create(args.json, "--json")
        if args.ptx is not None and os.path.lexists(args.ptx) and not os.path.isdir(args.ptx):
            raise HeadsteerError(f"--ptx {args.ptx} is not a folder; expected a folder (created if missing)")
        if args.ptx is not None and not os.path.lexists(args.ptx):
            check_can_create(args.ptx, "--ptx")
    except HeadsteerError as error:
        print(f"headsteer.kernels.aot: {error}", file=sys.stderr)
        return 2
    results = compile_all(args.arch, args.quick, args.only, args.ptx)
    if not results:  # (nothing was compiled: a misspelt --only would report an empty, passing set)
        print(f"headsteer.kernels.aot: no kernel compiled (--only {args.only!r} matches no variant"
              f"{' of --quick' if args.quick else ''})", file=sys.stderr)
        return 2
    print(f"{'variant':<34} {'kernel':<24} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'shared':>7}")
    for r in results:
        print(f"{r.variant:<34} {r.kernel:<24} {r.num_warps:>5} {r.registers:>5} {r.spill_stores:>5}/{r.spill_loads:<6} "
              f"{r.stack_bytes:>6} {r.shared_bytes:>7}")
    if args.json:
        from headsteer.runtime.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(dict(arch=args.arch, kernels=[asdict(r) for r in results]), indent=2))
    return 0


if __name__ == "__main__":
    # Run main from the package module, not this __main__ copy: the kernel wrappers consult the
    # package module's compile-only state.
    from headsteer.kernels.aot import main as package_main

    sys.exit(package_main())
