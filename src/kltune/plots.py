"""Plots and tables of logged training metrics, compared across arms and seeds.

The training driver appends one JSON object per iteration to a JSONL file per
run, with namespaced keys (``"reward/score_mean"``, ``"kl/mean"``,
``"kl/beta"``, ``"policy/entropy"``, ``"diversity/distinct_2"``, ...) and an
``"iteration"``. An experiment has *arms* (``"β = 0"``, ``"adaptive KL"``), each
run with several seeds; the functions here take ``runs``, a mapping from an
arm's label to its seeds' metrics files, and draw or tabulate them.

Everything goes through matplotlib's object API (``Figure`` with an Agg
canvas): no pyplot, no backend switch, no global state touched.
"""

import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kltune.functional import best_of_n_kl

__all__ = ["DEFAULT_KEYS", "plot_frontier", "plot_runs", "read_metrics", "summary_table"]

#: The keys :func:`plot_runs` and :func:`summary_table` show by default.
DEFAULT_KEYS: Final[tuple[str, ...]] = (
    "reward/score_mean",
    "kl/mean",
    "kl/beta",
    "policy/entropy",
    "diversity/distinct_2",
)

# Human labels for subplot titles and table headers; other keys show as themselves.
_LABELS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "reward/score_mean": "mean reward",
        "kl/mean": "KL(π‖π_ref) per completion (nats)",
        "kl/per_token": "KL(π‖π_ref) per token (nats)",
        "advantage/var": "advantage variance",
        "policy/grad_norm": "gradient norm",
        "kl/beta": "KL coefficient β",
        "policy/entropy": "token entropy (nats)",
        "diversity/distinct_1": "distinct-1",
        "diversity/distinct_2": "distinct-2",
        "diversity/distinct_3": "distinct-3",
        "diversity/unique_fraction": "unique completions (fraction)",
        "diversity/self_bleu": "self-BLEU (higher = less diverse)",
        "diversity/repetition_rate": "repetition rate (4-grams)",
        "collapse/ratio": "diversity / reference diversity",
    }
)

_BAND: Final = "line: mean over seeds; shaded: min–max over seeds"

PathArg = str | os.PathLike[str]
Records = Sequence[Mapping[str, float | int]]


def read_metrics(path: PathArg) -> list[dict[str, float | int]]:
    """Read a JSONL metrics file: one JSON object per line, one line per iteration.

    Numeric values (ints, floats, booleans, ``NaN``) are kept as floats, except
    ``"iteration"``, an int; other values (strings such as a run label, ``null``
    (a non-finite metric, see :doc:`/metrics`), lists) are dropped. Blank
    lines are skipped. A last line that is not valid JSON is skipped too: it is
    what a run still writing, or killed mid-write, leaves behind.

    Args:
        path: the metrics file.

    Returns:
        One dict per complete line, in file order.

    Raises:
        FileNotFoundError: ``path`` is not an existing file.
        ValueError: a line other than the last is not valid JSON, or a line
            holds JSON that is not an object.

    Example:
        >>> import pathlib, shutil, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> log = folder / "seed0.jsonl"
        >>> _ = log.write_text('{"iteration": 0, "kl/mean": 0.5, "arm": "x"}\\n{"iteration": 1, "k')
        >>> read_metrics(log)
        [{'iteration': 0, 'kl/mean': 0.5}]
        >>> shutil.rmtree(folder)
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"metrics file {str(file)!r} does not exist or is not a file")
    # errors="replace": a multi-byte character cut in half on the last line must
    # not fail the decode; the line is then invalid JSON and skipped below.
    lines = file.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):
                break
            raise ValueError(
                f"{file}:{lineno}: not valid JSON ({err.msg}); only the last line may be partial"
            ) from err
        if not isinstance(obj, dict):
            raise ValueError(f"{file}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        record = {k: float(v) for k, v in obj.items() if isinstance(v, int | float)}
        if "iteration" in record and float(record["iteration"]).is_integer():
            record["iteration"] = int(record["iteration"])
        records.append(record)
    return records


def _read_runs(
    runs: Mapping[str, Sequence[PathArg]],
) -> dict[str, list[list[dict[str, float | int]]]]:
    """Read every seed's file of every arm, checking the ``runs`` mapping's shape."""
    if not runs:
        raise ValueError("runs is empty; map each arm's label to its seeds' metrics files")
    loaded = {}
    for arm, files in runs.items():
        if isinstance(files, str | os.PathLike):
            raise TypeError(
                f"runs[{arm!r}] must be a list of metrics files (one per seed), got a "
                "single path; wrap it in a list"
            )
        if len(files) == 0:
            raise ValueError(f"runs[{arm!r}] lists no metrics file")
        loaded[arm] = [read_metrics(f) for f in files]
    return loaded


def _series(records: Records, key: str) -> dict[float, float]:
    """``{iteration: value}`` of one key's finite values; iteration = line index if absent."""
    return {
        float(r.get("iteration", i)): r[key]
        for i, r in enumerate(records)
        if key in r and math.isfinite(r[key])
    }


def _band(
    seeds: Sequence[Records], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Iterations and the mean, min and max over the seeds that logged each one."""
    series = [_series(records, key) for records in seeds]
    xs = sorted(set().union(*series))
    if not xs:
        return None
    table = np.array([[s.get(x, np.nan) for x in xs] for s in series])  # seeds × iterations
    logged = ~np.isnan(table)
    mean = np.where(logged, table, 0.0).sum(axis=0) / logged.sum(axis=0)
    low = np.where(logged, table, np.inf).min(axis=0)
    high = np.where(logged, table, -np.inf).max(axis=0)
    return np.array(xs), mean, low, high


def _arm_label(arm: str, n_seeds: int) -> str:
    return f"{arm} ({n_seeds} seed{'' if n_seeds == 1 else 's'})"


def _draw(
    runs: Mapping[str, Sequence[Records]], keys: Sequence[str], title: str | None = None
) -> Figure:
    """The figure of :func:`plot_runs` from records already read: one axes per key."""
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    figure = Figure(figsize=(4.3 * ncols, 3.1 * nrows + 0.8), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    for index, key in enumerate(keys):
        ax = figure.add_subplot(nrows, ncols, index + 1)
        ax.set_title(_LABELS.get(key, key), fontsize=11)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        drawn = False
        for color, seeds in enumerate(runs.values()):
            band = _band(seeds, key)
            if band is None:
                continue
            x, mean, low, high = band
            ax.plot(x, mean, color=f"C{color}", lw=1.6, marker="o" if len(x) == 1 else None)
            ax.fill_between(x, low, high, color=f"C{color}", alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [
        Line2D([], [], color=f"C{color}", lw=1.6, label=_arm_label(arm, len(seeds)))
        for color, (arm, seeds) in enumerate(runs.items())
    ]
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 2 * ncols - 1),  # about two entries fit per subplot width
        title=_BAND,
        title_fontsize=9,
        frameon=False,
    )
    if title is not None:
        figure.suptitle(title, fontsize=13)
    return figure


def _save_png(figure: Figure, out: Path) -> None:
    """Write a PNG atomically: a temp file in the same folder, then ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a results page must be readable
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_runs(
    runs: Mapping[str, Sequence[PathArg]],
    out: PathArg,
    keys: Sequence[str] = DEFAULT_KEYS,
    title: str | None = None,
) -> Path:
    """Plot metrics against iteration, one subplot per key, one line per arm.

    Each arm's line is the mean over its seeds at each iteration (over the
    seeds that logged that iteration) and the shaded band spans the minimum to
    the maximum over seeds; the legend says so and gives each arm's number of
    seeds. Non-finite values are skipped. A key an arm never logged is left
    out of that subplot; a key no arm logged gets an empty subplot marked "not
    logged". The x axis is the ``"iteration"`` key (the line's index when a
    record lacks it).

    Args:
        runs: arm label → its seeds' JSONL metrics files (see :func:`read_metrics`).
        out: where to write the PNG (folders are created); written atomically,
            so a reader never sees half an image.
        keys: metric keys, one subplot each, in a grid three wide.
        title: a title over the whole figure.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ValueError: ``out`` does not end in ``.png``, ``keys`` or ``runs`` is
            empty, an arm lists no file, or a file is malformed.
        TypeError: an arm maps to a single path instead of a list.
        FileNotFoundError: a metrics file is missing.

    Example:
        >>> import pathlib, shutil, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "s0.jsonl").write_text('{"iteration": 0, "kl/mean": 0.1}\\n')
        >>> plot_runs({"β = 0.1": [folder / "s0.jsonl"]}, folder / "kl.png", keys=["kl/mean"]).name
        'kl.png'
        >>> shutil.rmtree(folder)
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"out must be a .png file, got {str(out_path)!r}")
    if not keys:
        raise ValueError("keys is empty; give at least one metric key to plot")
    _save_png(_draw(_read_runs(runs), keys, title), out_path)
    return out_path


def _tail_mean(records: Records, key: str, last_k: int) -> float | None:
    """Mean of a run's last ``last_k`` finite values of ``key`` (by iteration)."""
    series = _series(records, key)
    tail = [series[x] for x in sorted(series)[-last_k:]]
    return math.fsum(tail) / len(tail) if tail else None


def _spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = math.fsum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


Spread = tuple[float, float]  # mean, sample std over seeds


def _frontier_points(
    loaded: Mapping[str, Sequence[Records]], reward_key: str, kl_key: str, last_k: int
) -> list[tuple[str, int, Spread, Spread]]:
    """Per arm: its label, seed count, (mean, std) of final KL and of final reward."""
    points = []
    for arm, seeds in loaded.items():
        kls, rewards = [], []
        for records in seeds:
            kl, reward = (
                _tail_mean(records, kl_key, last_k),
                _tail_mean(records, reward_key, last_k),
            )
            if kl is None or reward is None:
                raise ValueError(
                    f"arm {arm!r} has a run that never logged {kl_key!r} or {reward_key!r}"
                )
            kls.append(kl)
            rewards.append(reward)
        points.append((arm, len(seeds), _spread(kls), _spread(rewards)))
    return points


def plot_frontier(
    runs: Mapping[str, Sequence[PathArg]],
    out: PathArg,
    best_of_n: Mapping[int, float] | None = None,
    last_k: int = 5,
    reward_key: str = "reward/score_mean",
    kl_key: str = "kl/mean",
    title: str | None = None,
) -> Path:
    r"""Final reward against final KL: one point per arm, seeds as error bars.

    The KL-regularised analogue of Ziegler et al.'s reward–KL plot. Each seed
    contributes the mean of its last ``last_k`` values of ``reward_key`` and of
    ``kl_key``; an arm's point is the mean over seeds and its error bars the
    sample standard deviation over seeds on both axes. With ``best_of_n``, the
    curve of best-of-n sampling from the reference is drawn too, at its exact
    KL :math:`\log n - (n-1)/n` (:func:`kltune.functional.best_of_n_kl`): a
    trained policy below that curve bought less reward per nat than picking the
    best of n samples would. The KL axis is linear up to 1 nat and logarithmic
    beyond, so that both 0.3 nats and 90 nats are readable.

    Args:
        runs: arm label → its seeds' JSONL metrics files.
        out: where to write the PNG, atomically.
        best_of_n: n → expected best-of-n reward from the reference
            (:func:`kltune.functional.expected_best_of_n`), or None.
        last_k: final iterations averaged per seed, >= 1.
        reward_key: the metric on the y axis.
        kl_key: the metric on the x axis.
        title: a title over the figure.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ValueError: ``out`` does not end in ``.png``, ``last_k < 1``, ``runs``
            is empty, a seed never logged a key, or ``best_of_n`` has an n < 1.
        FileNotFoundError: a metrics file is missing.
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"out must be a .png file, got {str(out_path)!r}")
    if last_k < 1:
        raise ValueError(f"last_k must be >= 1, got {last_k}")
    points = _frontier_points(_read_runs(runs), reward_key, kl_key, last_k)
    figure = Figure(figsize=(7.5, 5.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if best_of_n:
        ns = sorted(best_of_n)
        if ns[0] < 1:
            raise ValueError(f"best_of_n has n = {ns[0]}; n must be >= 1")
        xs = [best_of_n_kl(n) for n in ns]
        ax.plot(xs, [best_of_n[n] for n in ns], color="0.4", lw=1.4, ls="--", marker=".")
        for n, x in zip(ns, xs, strict=True):
            ax.annotate(
                f"n={n}",
                (x, best_of_n[n]),
                textcoords="offset points",
                xytext=(3, -10),
                fontsize=7,
                color="0.35",
            )
    for i, (arm, n_seeds, (kl, kl_sd), (reward, reward_sd)) in enumerate(points):
        ax.errorbar(
            kl,
            reward,
            xerr=kl_sd,
            yerr=reward_sd,
            fmt="osD^v"[i // 10 % 5],  # past ten arms the colours repeat: the marker differs
            color=f"C{i % 10}",
            capsize=3,
            label=_arm_label(arm, n_seeds),
        )
    if best_of_n:
        ax.plot([], [], color="0.4", ls="--", marker=".", label="best-of-n from π_ref")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel(f"{_LABELS.get(kl_key, kl_key)}, mean of the last {last_k} iterations")
    ax.set_ylabel(f"{_LABELS.get(reward_key, reward_key)}, mean of the last {last_k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="error bars: std over seeds", title_fontsize=8)
    if title is not None:
        ax.set_title(title)
    _save_png(figure, out_path)
    return out_path


def _cell(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean = math.fsum(present) / len(present)
    if len(present) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {statistics.stdev(present):.2g}"


def summary_table(
    runs: Mapping[str, Sequence[PathArg]], keys: Sequence[str] = DEFAULT_KEYS, last_k: int = 5
) -> str:
    r"""A markdown table of each arm's final metrics: mean ± std over seeds.

    For each arm and key, each seed contributes the mean of its last
    ``last_k`` finite values of the key (ordered by iteration); a cell shows
    the mean over seeds ± the sample standard deviation over seeds
    (:math:`n - 1` in the denominator; a single seed shows its value alone),
    to 3 and 2 significant digits. Seeds that never logged a key are left out
    of its cell; a key no seed logged shows "–". Headers use human labels.

    Args:
        runs: arm label → its seeds' JSONL metrics files.
        keys: metric keys, one column each.
        last_k: how many final iterations to average per seed, >= 1.

    Returns:
        The table, as a header row, an alignment row and one row per arm; lines
        joined by newlines, no trailing newline.

    Raises:
        ValueError: ``last_k < 1``, ``keys`` or ``runs`` empty, or a malformed file.
        TypeError: an arm maps to a single path instead of a list.
        FileNotFoundError: a metrics file is missing.

    Example:
        >>> import pathlib, shutil, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for seed, kl in enumerate([0.1, 0.3]):
        ...     _ = (folder / f"s{seed}.jsonl").write_text(f'{{"kl/mean": {kl}}}\n')
        >>> runs = {"adaptive KL": [folder / "s0.jsonl", folder / "s1.jsonl"]}
        >>> print(summary_table(runs, keys=["kl/mean"]))
        | arm | seeds | KL(π‖π_ref) per completion (nats) |
        | --- | ---: | ---: |
        | adaptive KL | 2 | 0.2 ± 0.14 |
        >>> shutil.rmtree(folder)
    """
    if last_k < 1:
        raise ValueError(f"last_k must be >= 1, got {last_k}")
    if not keys:
        raise ValueError("keys is empty; give at least one metric key to tabulate")
    loaded = _read_runs(runs)
    rows = [
        ["arm", "seeds", *(_LABELS.get(key, key) for key in keys)],
        ["---", "---:", *(["---:"] * len(keys))],
    ]
    for arm, seeds in loaded.items():
        cells = [_cell([_tail_mean(records, key, last_k) for records in seeds]) for key in keys]
        rows.append([arm.replace("|", "\\|"), str(len(seeds)), *cells])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
