"""Every Triton kernel compiles for an H100 (sm_90) even on a machine without a GPU, within the
hardware's shared-memory limit and without spilling registers at the benchmark shapes (bf16 and fp32).

The CPU interpreter that runs the other kernel tests here accepts programs the GPU compiler
rejects; this compiles the real launches with Triton's NVIDIA backend and ptxas
(`headsteer.kernels.aot`), in a subprocess because the interpreter is chosen at import time."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100_SHARED_PER_BLOCK = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
# ptxas sometimes trades a handful of registers for occupancy (e.g. stops at 128 registers and
# spills 20 bytes); a kernel whose working tile does not fit spills kilobytes.
NEGLIGIBLE_SPILL_BYTES = 128


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aot")
    out, ptx = folder / "kernels.json", folder / "ptx"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "headsteer.kernels.aot", "--quick", "--json", str(out),
                             "--ptx", str(ptx)], env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 and "Triton" in result.stderr and "driver" in result.stderr:
        pytest.skip(f"this Triton's driver interface cannot be swapped for compile-only use: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(out.read_text()), ptx_dir=ptx)


def test_ptx_written_per_launch_without_debug_information(report):
    """`--ptx` writes one file per compiled launch, named after its variant and kernel, with the
    code (an .entry) and none of the line information that would differ between checkouts."""
    files = sorted(report["ptx_dir"].glob("*/*.ptx"))
    assert len(files) == len(report["kernels"])
    assert {path.name.split("_", 1)[1].removesuffix(".ptx") for path in files} == {k["kernel"] for k in report["kernels"]}
    for path in files:
        text = path.read_text()
        assert ".entry" in text and ".loc" not in text and ".debug" not in text, path
    assert not [path for path in files if " " in path.parent.name]  # variant names, spaces replaced


def test_normalized_ptx_ignores_moved_lines_only():
    from headsteer.kernels.aot import normalized_ptx

    def ptx(line: int, constant: str) -> str:
        return (f"// generated\n.file 1 \"k.py\"\n.entry k()\n{{\n$L__tmp{line}:\n\t.loc 1 {line} 5\n"
                f"\tmov.u32 %r1, {constant};\n}}\n\t.section\t.debug_info\n{{ .b32 {line} }}\n")

    assert normalized_ptx(ptx(10, "7")) == normalized_ptx(ptx(42, "7"))
    assert normalized_ptx(ptx(10, "7")) != normalized_ptx(ptx(10, "8"))


def test_every_kernel_compiles_for_sm90(report):
    assert report["arch"] == 90
    compiled = {(k["variant"].split()[0], k["kernel"]) for k in report["kernels"]}
    assert compiled == {
        ("attention", "_qkv_kernel"), ("attention", "_attention_kernel"), ("attention", "_proj_kernel"),
        ("gate", "_sae_steer_gate_kernel"),
    }


def test_kernels_fit_an_h100_without_spilling(report):
    for kernel in report["kernels"]:
        name = f"{kernel['variant']} / {kernel['kernel']}"
        assert kernel["shared_bytes"] <= H100_SHARED_PER_BLOCK, name
        assert kernel["spill_stores"] <= NEGLIGIBLE_SPILL_BYTES and kernel["spill_loads"] <= NEGLIGIBLE_SPILL_BYTES, name
        assert 0 < kernel["registers"] <= 255, name


def test_one_compile_serves_every_batch_size(report):
    """The gate and the default attention branch's kernels do not specialize on the batch size (a
    server sees many; the TopK gate takes 2-3 s to compile), so batches 1, 7 and 64 share one kernel."""
    keys = {(k["variant"], k["kernel"]): k["cache_key"] for k in report["kernels"]}
    gate = "gate ViT-S topk scale+shift"
    assert keys[(gate, "_sae_steer_gate_kernel")] == keys[(f"{gate} batch 1", "_sae_steer_gate_kernel")] \
        == keys[(f"{gate} batch 7", "_sae_steer_gate_kernel")]
    attention = "attention ViT-S bfloat16"
    for kernel in ("_qkv_kernel", "_attention_kernel", "_proj_kernel"):
        assert keys[(attention, kernel)] == keys[(f"{attention} batch 1", kernel)] == keys[(f"{attention} batch 7", kernel)]
    assert len({keys[(gate, "_sae_steer_gate_kernel")], keys[("gate ViT-S no SAE", "_sae_steer_gate_kernel")]}) == 2


def test_programmatic_launch_only_where_asked(report):
    """The opt-in programmatic dependent launch reaches every kernel of the branch it is asked for
    (launched with launch_pdl, griddepcontrol.wait in the code) and no other launch."""
    for kernel in report["kernels"]:
        asked = kernel["variant"].endswith("programmatic-launch")
        assert kernel["programmatic_launch"] == asked, f"{kernel['variant']} / {kernel['kernel']}"
    assert {k["kernel"] for k in report["kernels"] if k["programmatic_launch"]} == {
        "_qkv_kernel", "_attention_kernel", "_proj_kernel"}


def test_ctrl_c_is_status_130_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C while compiling (minutes for the full set) printed a KeyboardInterrupt traceback."""
    from headsteer.kernels import aot

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "compile_all", interrupted)
    assert aot.main(["--quick"]) == 130
    assert capsys.readouterr().err.strip() == "headsteer.kernels.aot: interrupted"


@pytest.mark.parametrize("arch", ["0", "91"])
def test_an_arch_no_gpu_has_is_refused_before_compiling(arch):
    """--arch 0 or 91 reached Triton's LLVM backend, which aborted the process (status 134, a
    core dump and LLVM's stack dump) instead of a one-line error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "headsteer.kernels.aot", "--quick", "--only", "gate ViT-S no SAE budget",
                             "--arch", arch], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-500:]
    assert result.stderr.strip() == (f"headsteer.kernels.aot: --arch {arch} is not a GPU compute capability; "
                                     "expected one of 70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121")
    assert result.stdout == ""


@pytest.mark.parametrize("option", ["--json", "--ptx"])
def test_an_output_path_that_cannot_be_written_is_refused_before_compiling(monkeypatch, capsys, tmp_path, option):
    """--json naming a folder, or --json/--ptx under a file, failed with a traceback only after
    every kernel was compiled (minutes)."""
    from headsteer.kernels import aot

    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the output paths were checked")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "compile_all", compiled)
    (tmp_path / "file").write_text("")
    bad = [str(tmp_path / "file" / "out"), str(tmp_path if option == "--json" else tmp_path / "file")]
    for path in bad:
        assert aot.main(["--quick", option, path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"headsteer.kernels.aot: {option} {path} ") and len(err.strip().splitlines()) == 1, err


def test_only_matching_no_variant_is_an_error(tmp_path):
    """A misspelt --only compiled nothing, printed an empty table, wrote an empty report and
    exited 0, as if every kernel had passed. (In a subprocess, like `report`: the kernel modules
    it imports without TRITON_INTERPRET would otherwise stay compiled-only for the tests after it.)"""
    report = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "headsteer.kernels.aot", "--quick", "--only", "gate ViT-Z",
                             "--json", str(report)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "headsteer.kernels.aot: no kernel compiled (--only 'gate ViT-Z' matches no variant of --quick)")
    assert result.stdout == "" and not report.exists()


def test_normalized_ptx_ignores_comments_file_paths_and_function_labels():
    from headsteer.kernels.aot import normalized_ptx

    def ptx(line: int, checkout: str) -> str:
        return (f"//\n// Generated from {checkout}/kernels/k.py\n\t.file\t1 \"{checkout}/kernels/k.py\"\n"
                f".entry k()\n{{\n$L__func_begin{line}:\n\tret;\n$L__func_end{line}:\n}}\n")

    text = normalized_ptx(ptx(3, "/home/a"))
    assert text == normalized_ptx(ptx(9, "/tmp/b")) and text.endswith("}\n") and "\tret;" in text


PTXAS_OUTPUT = ("ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
                "ptxas info    : Function properties for _k\n    24 bytes stack frame, 16 bytes spill stores, 8 bytes "
                "spill loads\nptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]\n")


@pytest.mark.parametrize("arch, gpu_name, tool", [(80, "sm_80", "ptxas"), (90, "sm_90a", "ptxas"),
                                                  (100, "sm_100a", "ptxas_blackwell")])
def test_ptxas_report_reads_registers_spills_and_stack(monkeypatch, arch, gpu_name, tool):
    """ptxas -v prints its report on stderr; each number is read from its own line part, and the
    target is the arch-specific (sm_XXa) one from Hopper on, with Blackwell's own ptxas."""
    import types

    import triton

    from headsteer.kernels import aot

    path = getattr(triton.knobs.nvidia, tool).path  # (found before subprocess is replaced: Triton runs it)
    commands = []

    def ptxas(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="", stderr=PTXAS_OUTPUT)

    monkeypatch.setattr(aot, "subprocess", types.SimpleNamespace(run=ptxas))
    kernel = type("Kernel", (), {"asm": {"ptx": ".entry _k() {}"}})()
    assert aot.ptxas_report(kernel, arch) == dict(registers=168, spill_stores=16, spill_loads=8, stack_bytes=24)
    (command,) = commands
    assert command[0] == path and f"--gpu-name={gpu_name}" in command


def test_compile_only_targets_the_gpu_inside_and_restores_everything_after(monkeypatch):
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    from headsteer.kernels import aot

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    driver = triton.runtime.driver
    previous, run = object(), JITFunction.run
    monkeypatch.setattr(driver, "_active", previous)
    cpu = torch.device("cpu")
    with pytest.raises(KeyError):  # left by an error too
        with aot.compile_only(80):
            assert aot.targets_cuda(cpu) and aot.cuda_capability(cpu) == 80 and aot.fp32_dot_precision(cpu) == "tf32x3"
            assert driver.active.get_current_target().arch == 80 and JITFunction.run is not run
            raise KeyError
    assert driver._active is previous and JITFunction.run is run
    assert not aot.targets_cuda(cpu) and aot.cuda_capability(cpu) is None and aot.fp32_dot_precision(cpu) == "ieee"


def test_interpreted_kernels_are_refused_before_compiling(monkeypatch, capsys):
    from headsteer.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(aot, "compile_all", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        with aot.compile_only():
            pytest.fail("entered")
    assert aot.main(["--quick"]) == 2
    assert capsys.readouterr().err.strip() == (
        "headsteer.kernels.aot: unset TRITON_INTERPRET; interpreted kernels are never compiled")
