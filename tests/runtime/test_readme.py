"""The README runs as written: its Python example executes, and every command line it shows parses
with the real command-line parsers (flags, choices, subcommands, extras)."""
import argparse
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no ```python example"
    monkeypatch.chdir(tmp_path)  # it writes "my-bundle" into the current folder
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    result = namespace["result"]
    assert len(result.class_names) == 1 and result.head_usage.shape == (1,)
    assert (tmp_path / "my-bundle" / "headsteer.json").is_file()


# -- the README's command lines -------------------------------------------------------------------
# Each `headsteer ...` / `python -m headsteer...` line the README shows (in ```bash blocks and in
# inline code) is parsed by the real argument parser, every optional part and every alternative
# included: a flag, a choice or a subcommand the README names but the CLI no longer has fails here.
# Parsing only: running them is what the commands' own tests do.
PLACEHOLDERS = {"BUNDLE": "my-bundle", "IMAGE...": "image.png", "CLASS": "7", "DIR": "out", "B": "b", "F": "f.out", "N": "8"}


def _readme_commands(prefix: str) -> list[str]:
    text = README.read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap lines
    commands = []
    for line in lines:
        for part in line.split("#")[0].split("&&"):
            part = part.strip()
            words = part.split()[1:]
            named_only = not any(w.startswith("-") or w.strip("[]") in PLACEHOLDERS for w in words[1:])
            if part.startswith(prefix) and "--help" not in part and not (prefix == "headsteer " and named_only):
                commands.append(part)  # not a bare mention such as `headsteer train steering`
    return commands


def _expand(command: str) -> list[list[str]]:
    """argv lists: brackets dropped (optional parts included), `a|b` and `{a,b}` one argv each."""
    variants = [[]]
    for token in command.replace("[", " ").replace("]", " ").split():
        token = PLACEHOLDERS.get(token, token)
        if token.startswith("{") and token.endswith("}"):
            choices = token[1:-1].split(",")
        elif "|" in token:
            choices = token.split("|")
        else:
            choices = [token]
        variants = [argv + [choice] for argv in variants for choice in choices]
    return variants


def _exact(parser):
    """The parser and its subcommands' parsers, taking only whole option names (argparse would
    accept a README's `--max-b` for `--max-batch`)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if action.nargs == argparse.PARSER else ():
            _exact(sub)
    return parser


def test_readme_headsteer_command_lines_parse():
    from headsteer.bench.harness import BACKEND_FACTORIES
    from headsteer.runtime.cli import build_parser

    commands = _readme_commands("headsteer ")
    shown = {command.split()[1] for command in commands}
    assert {"demo", "eval", "train", "info", "predict", "export", "bench"} <= shown, shown
    for command in commands:
        for argv in _expand(command):
            try:
                args = _exact(build_parser()).parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"README command does not parse: {' '.join(argv)} (from `{command}`)")
            assert args.handler, command
            for backend in getattr(args, "backends", None) or []:
                assert backend in BACKEND_FACTORIES, f"README names bench backend {backend!r}: {command}"


def test_readme_python_module_command_lines_parse(monkeypatch):
    from headsteer.bench import kernels as bench_kernels
    from headsteer.kernels import aot

    commands = _readme_commands("python -m headsteer.")
    modules = {command.split()[2] for command in commands}
    assert modules == {"headsteer.kernels.aot", "headsteer.bench.kernels"}, modules
    compiled = []
    one_kernel = aot.CompiledKernel(variant="v", kernel="k", registers=32, spill_stores=0, spill_loads=0,
                                    stack_bytes=0, shared_bytes=0, num_warps=4, programmatic_launch=False,
                                    cache_key="0")
    monkeypatch.setattr(aot, "compile_all", lambda *args: compiled.append(args) or [one_kernel])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # aot refuses to run interpreted
    for command in commands:
        for argv in _expand(command):
            try:
                if argv[2] == "headsteer.kernels.aot":
                    assert aot.main(argv[3:]) == 0
                else:
                    bench_kernels.parse_args(argv[3:])
            except SystemExit:
                pytest.fail(f"README command does not parse: {' '.join(argv)} (from `{command}`)")
    assert compiled, "no README line ran headsteer.kernels.aot"


def test_readme_install_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    text = README.read_text()
    named = set(re.findall(r'pip install -e "\.\[([a-z,]+)\]"', text))
    assert named, "the README shows no pip install of an extra"
    for group in named:
        assert set(group.split(",")) <= extras, group
    listed = re.search(r"^Extras: (.*?)\.$", text, flags=re.M | re.S)
    assert listed and set(re.findall(r"`(\w+)`", listed.group(1))) == extras
