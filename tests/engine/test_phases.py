"""The step's phase timeline chart."""

from __future__ import annotations


def test_plot_timeline_leaves_the_callers_matplotlib_backend(tmp_path):
    # A library function: it draws its PNG without switching the process's backend (a notebook's inline one).
    matplotlib = __import__("pytest").importorskip("matplotlib")
    from rollout_sleep.engine.phases import plot_timeline

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        png = plot_timeline([{"generate_s": 1.0, "train_s": 2.0}, {"generate_s": 0.5, "sleep_s": 0.1}],
                            tmp_path / "t.png")
        assert png is not None and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        matplotlib.use(before)
