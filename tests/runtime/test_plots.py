"""The demo report's plots: the files plot_paths names, written atomically, with the bars and
heatmaps drawn from the report's numbers."""
import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from headsteer.runtime.plots import plot_paths, write_plots  # noqa: E402


def _part(usage, heads, fractions):
    return dict(final_block_usage=usage, head_usage=usage / 2, kept_heads=heads, final_block_head_usage=fractions)


def _report():
    """Two classes, three heads; class b's unsteered part records kept heads without fractions."""
    rows = [
        dict({"class": "a"}, unsteered=_part(0.9, [0, 1], [1.0, 0.6, 0.2]), steered=_part(0.5, [0], [0.8, 0.4, 0.0]),
             random=_part(0.85, [0, 1], [1.0, 0.7, 0.1])),
        dict({"class": "b"}, unsteered=_part(0.7, [2], None), steered=_part(0.3, None, [0.0, 0.0, 0.3]),
             random=_part(0.65, [2], [0.0, 0.0, 0.9])),
    ]
    return dict(model=dict(heads=3), per_class=rows, whole_network=dict(per_class=rows))


def test_write_plots_writes_the_files_plot_paths_names_and_closes_its_figures(tmp_path):
    figures = plt.get_fignums()
    written = write_plots(_report(), tmp_path)
    assert written == plot_paths(tmp_path, whole_network=True)
    assert sorted(tmp_path.iterdir()) == sorted(written)
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)
    assert plt.get_fignums() == figures


def test_a_plot_that_fails_to_save_leaves_no_file(tmp_path, monkeypatch):
    def half_written(self, path, **kwargs):
        open(path, "wb").write(b"\x89PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_plots(_report(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_plot_that_fails_to_save_is_closed(tmp_path, monkeypatch):
    """pyplot keeps every open figure alive: a service that retries write_plots after a full disk
    would pile them up (and matplotlib warns past 20)."""
    figures = plt.get_fignums()

    def disk_full(self, path, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_plots(_report(), tmp_path)
    assert plt.get_fignums() == figures


def test_bars_and_heatmaps_show_the_reports_numbers(tmp_path, monkeypatch):
    """Bars: unsteered, steered, random per class (final-block usage; whole-model usage in the
    _all plots). Heatmaps: per-head fractions, or 1 at each kept head where none are recorded."""
    bars, grids = [], []
    real_bar, real_imshow = Axes.bar, Axes.imshow
    monkeypatch.setattr(Axes, "bar", lambda self, x, height, *a, **k: bars.append(list(height)) or
                        real_bar(self, x, height, *a, **k))
    monkeypatch.setattr(Axes, "imshow", lambda self, grid, *a, **k: grids.append(grid.tolist()) or
                        real_imshow(self, grid, *a, **k))
    write_plots(_report(), tmp_path)
    assert bars == [[0.9, 0.7], [0.5, 0.3], [0.85, 0.65], [0.45, 0.35], [0.25, 0.15], [0.425, 0.325]]
    unsteered = [[1.0, 0.6, 0.2], [0.0, 0.0, 1.0]]
    steered = [[0.8, 0.4, 0.0], [0.0, 0.0, 0.3]]
    assert grids == [unsteered, steered, unsteered, steered]
