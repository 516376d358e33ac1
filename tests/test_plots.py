"""Tests of kltune.plots: reading JSONL logs, the figure, the PNG and the summary table."""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from kltune.plots import (
    DEFAULT_KEYS,
    _draw,
    _frontier_points,
    _read_runs,
    plot_frontier,
    plot_runs,
    read_metrics,
    summary_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, columns: Mapping[str, Sequence[float]], partial: bool = True) -> Path:
    """One record per iteration from per-key columns, plus a half-written last line."""
    length = len(next(iter(columns.values())))
    lines = [
        json.dumps({"iteration": i, **{k: v[i] for k, v in columns.items()}}, allow_nan=True)
        for i in range(length)
    ]
    text = "\n".join(lines) + "\n"
    if partial:
        text += f'{{"iteration": {length}, "reward/score_mean": 0.'
    path.write_text(text)
    return path


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, list[Path]]:
    """Two arms: "β = 0" (two seeds) and "adaptive KL" (one seed, no distinct-2)."""
    beta0 = [
        write_run(
            tmp_path / "beta0_s0.jsonl",
            {
                "reward/score_mean": [0.1, 0.2, 0.3, 0.5],
                "kl/mean": [0.0, 1.0, 2.0, 4.0],
                "kl/beta": [0.0] * 4,
                "policy/entropy": [3.0, 2.0, 1.0, 0.5],
                "diversity/distinct_2": [0.9, 0.5, 0.2, 0.1],
            },
        ),
        write_run(
            tmp_path / "beta0_s1.jsonl",
            {
                "reward/score_mean": [0.1, 0.2, 0.3, 0.7],
                "kl/mean": [0.0, 2.0, 4.0, 6.0],
                "kl/beta": [0.0] * 4,
                "policy/entropy": [3.0, 2.5, 1.5, 0.5],
                "diversity/distinct_2": [0.9, 0.6, math.nan, 0.3],
            },
        ),
    ]
    adaptive = [
        write_run(
            tmp_path / "adaptive_s0.jsonl",
            {
                "reward/score_mean": [0.0, 0.1, 0.2, 0.3],
                "kl/mean": [0.0, 0.1, 0.2, 0.3],
                "kl/beta": [0.1, 0.12, 0.14, 0.16],
                "policy/entropy": [3.0, 2.9, 2.8, 2.7],
            },
        )
    ]
    return {"β = 0": beta0, "adaptive KL": adaptive}


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_skips_a_partial_last_line(runs: dict[str, list[Path]]) -> None:
    records = read_metrics(runs["adaptive KL"][0])
    assert [r["iteration"] for r in records] == [0.0, 1.0, 2.0, 3.0]
    assert records[1] == {
        "iteration": 1.0,
        "reward/score_mean": 0.1,
        "kl/mean": 0.1,
        "kl/beta": 0.12,
        "policy/entropy": 2.9,
    }


def test_read_metrics_keeps_numbers_and_drops_other_values(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 2, "arm": "x", "ok": true, "x": NaN, "n": null}\n\n')
    (record,) = read_metrics(path)
    assert set(record) == {"iteration", "ok", "x"}
    assert record["iteration"] == 2.0 and record["ok"] == 1.0 and math.isnan(record["x"])


def test_read_metrics_of_an_empty_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    assert read_metrics(tmp_path / "empty.jsonl") == []


def test_read_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        read_metrics(tmp_path / "nowhere.jsonl")


def test_read_metrics_rejects_a_broken_line_before_the_last(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1, \n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_read_metrics_rejects_a_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: expected a JSON object, got list"):
        read_metrics(path)


# ---------------------------------------------------------------- the figure


def loaded(runs: Mapping[str, Sequence[Path]]) -> dict[str, list[list[dict[str, float]]]]:
    return {arm: [read_metrics(p) for p in paths] for arm, paths in runs.items()}


def test_figure_has_one_labelled_axes_per_key(runs: dict[str, list[Path]]) -> None:
    figure = _draw(loaded(runs), DEFAULT_KEYS, title="β = 0 against adaptive KL")
    assert len(figure.axes) == len(DEFAULT_KEYS) == 5
    assert [ax.get_title() for ax in figure.axes] == [
        "mean reward",
        "KL(π‖π_ref) per completion (nats)",
        "KL coefficient β",
        "token entropy (nats)",
        "distinct-2",
    ]
    assert all(ax.get_xlabel() == "iteration" for ax in figure.axes)
    assert len(_draw(loaded(runs), ["kl/mean", "kl/beta"]).axes) == 2


def test_figure_lines_are_seed_means_with_a_band_per_arm(runs: dict[str, list[Path]]) -> None:
    kl_axes = _draw(loaded(runs), ["kl/mean"]).axes[0]
    beta0, adaptive = kl_axes.lines
    assert np.asarray(beta0.get_xdata()).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.asarray(beta0.get_ydata()).tolist() == pytest.approx(
        [0.0, 1.5, 3.0, 5.0]
    )  # mean of 2 seeds
    assert np.asarray(adaptive.get_ydata()).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    bands = [c for c in kl_axes.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2


def test_figure_skips_a_key_an_arm_did_not_log(runs: dict[str, list[Path]]) -> None:
    figure = _draw(loaded(runs), ["diversity/distinct_2", "no/such_key"])
    distinct, missing = figure.axes
    # Only the β = 0 arm logged distinct-2; the NaN at iteration 2 leaves one seed there.
    (line,) = distinct.lines
    assert np.asarray(line.get_ydata()).tolist() == pytest.approx([0.9, 0.55, 0.2, 0.2])
    assert len(missing.lines) == 0 and [t.get_text() for t in missing.texts] == ["not logged"]


def test_shared_legend_names_arms_seeds_and_band(runs: dict[str, list[Path]]) -> None:
    figure = _draw(loaded(runs), DEFAULT_KEYS)
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["β = 0 (2 seeds)", "adaptive KL (1 seed)"]
    assert "min–max over seeds" in legend.get_title().get_text()


# ---------------------------------------------------------------- plot_runs


def test_plot_runs_writes_a_png_atomically(runs: dict[str, list[Path]], tmp_path: Path) -> None:
    out = tmp_path / "figures" / "runs.png"
    assert plot_runs(runs, out, title="test") == out
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    # Overwrite in place; no temp file left next to it.
    plot_runs({"β = 0": [str(p) for p in runs["β = 0"]]}, str(out), keys=["kl/mean"])
    assert out.read_bytes().startswith(PNG_MAGIC) and out.read_bytes() != data
    assert [p.name for p in out.parent.iterdir()] == ["runs.png"]


def test_plot_runs_validation(runs: dict[str, list[Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png"):
        plot_runs(runs, tmp_path / "runs.svg")
    with pytest.raises(ValueError, match="runs is empty"):
        plot_runs({}, tmp_path / "runs.png")
    with pytest.raises(ValueError, match="keys is empty"):
        plot_runs(runs, tmp_path / "runs.png", keys=[])
    with pytest.raises(ValueError, match="lists no metrics file"):
        plot_runs({"arm": []}, tmp_path / "runs.png")
    # A str is itself a Sequence[str], so only our check catches a bare path string.
    with pytest.raises(TypeError, match="single path"):
        plot_runs({"arm": str(runs["β = 0"][0])}, tmp_path / "runs.png")
    with pytest.raises(FileNotFoundError, match=r"gone\.jsonl"):
        plot_runs({"arm": [tmp_path / "gone.jsonl"]}, tmp_path / "runs.png")
    assert not (tmp_path / "runs.png").exists()


# ---------------------------------------------------------------- summary_table


def test_summary_table_by_hand(runs: dict[str, list[Path]]) -> None:
    keys = ["reward/score_mean", "kl/mean", "diversity/distinct_2"]
    table = summary_table(runs, keys, last_k=2)
    # β = 0, last two iterations per seed:
    #   reward: (0.3+0.5)/2 = 0.4 and (0.3+0.7)/2 = 0.5 -> 0.45 ± stdev 0.0707
    #   KL: (2+4)/2 = 3 and (4+6)/2 = 5 -> 4 ± √2 = 1.41
    #   distinct-2: (0.2+0.1)/2 = 0.15 and, NaN skipped, the last two finite
    #   values 0.6 and 0.3 -> 0.45; mean 0.3 ± stdev 0.212
    # adaptive KL (one seed): reward 0.25, KL 0.25, distinct-2 never logged.
    assert table.splitlines() == [
        "| arm | seeds | mean reward | KL(π‖π_ref) per completion (nats) | distinct-2 |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| β = 0 | 2 | 0.45 ± 0.071 | 4 ± 1.4 | 0.3 ± 0.21 |",
        "| adaptive KL | 1 | 0.25 | 0.25 | – |",
    ]


def test_summary_table_last_k_longer_than_the_run_averages_everything(
    runs: dict[str, list[Path]],
) -> None:
    table = summary_table({"adaptive KL": runs["adaptive KL"]}, ["kl/beta"], last_k=100)
    assert table.splitlines()[-1] == "| adaptive KL | 1 | 0.13 |"  # mean of .10 .12 .14 .16


def test_summary_table_escapes_pipes_and_checks_last_k(runs: dict[str, list[Path]]) -> None:
    table = summary_table({"a|b": runs["adaptive KL"]}, ["kl/mean"], last_k=1)
    assert table.splitlines()[-1] == "| a\\|b | 1 | 0.3 |"
    with pytest.raises(ValueError, match="last_k"):
        summary_table(runs, ["kl/mean"], last_k=0)


# ---------------------------------------------------------------- plot_frontier


def test_frontier_points_are_seed_means_of_tail_means(runs: dict[str, list[Path]]) -> None:
    points = _frontier_points(_read_runs(runs), "reward/score_mean", "kl/mean", last_k=2)
    (beta0, n0, kl0, reward0), (adaptive, n1, kl1, reward1) = points
    assert (beta0, n0, adaptive, n1) == ("β = 0", 2, "adaptive KL", 1)
    # seed tails: KL (2 + 4) / 2 = 3 and (4 + 6) / 2 = 5; reward 0.4 and 0.5
    assert kl0 == pytest.approx((4.0, math.sqrt(2)))
    assert reward0 == pytest.approx((0.45, math.sqrt(0.005)))
    assert kl1 == pytest.approx((0.25, 0.0)) and reward1 == pytest.approx((0.25, 0.0))


def test_plot_frontier_writes_a_png_with_the_best_of_n_curve(
    runs: dict[str, list[Path]], tmp_path: Path
) -> None:
    out = plot_frontier(runs, tmp_path / "f.png", best_of_n={1: 0.1, 2: 0.2, 8: 0.4})
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert list(tmp_path.glob(".f.png.*")) == []  # no temp file left behind


def test_plot_frontier_validation(runs: dict[str, list[Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png"):
        plot_frontier(runs, tmp_path / "f.pdf")
    with pytest.raises(ValueError, match="last_k"):
        plot_frontier(runs, tmp_path / "f.png", last_k=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        plot_frontier(runs, tmp_path / "f.png", best_of_n={0: 0.1})
    with pytest.raises(ValueError, match="never logged 'kl/missing'"):
        plot_frontier(runs, tmp_path / "f.png", kl_key="kl/missing")
    assert not (tmp_path / "f.png").exists()
