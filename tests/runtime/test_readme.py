"""The README's Python example runs as written (it imports what it shows, and every call works)."""
import re
from pathlib import Path

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
