"""The paper's figures from a sweep's DataFrames, as matplotlib ``Figure`` objects.

    fig = accuracy_vs(load_sweep("results/m_sharpness_study"), x="sharpness_m")
    save(fig, "figures/m_vs_acc")                # figures/m_vs_acc.png and .pdf

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: nothing is
shown, nothing is registered in pyplot's global list (a loop over 100 trials leaks no figures), and
rendering uses the Agg canvas whatever backend the session has. Notebooks still display a returned
figure. Like ``analysis.tables``, the functions that take a ``load_sweep`` frame use only its
``TERMINATED`` rows when it has a ``status`` column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

from analysis.correlation import kendall_tau
from analysis.tables import METHOD_LABELS, PERTURBATION_LABELS

DONE = "TERMINATED"
AXIS_LABELS = {
    "rho": "ρ (perturbation radius)",
    "sharpness_m": "m (examples per perturbation)",
    "gen_gap": "generalization gap (train − val top-1, %)",
    "epoch": "epoch",
}
DEFAULT_CURVES = ("train/loss", "val/loss", "val/top1", "forget/flip_rate", "forget/loss_increase", "forget/kl")
LOG_AXES = ("rho", "sharpness_m")
MAX_LEGEND = 12  # more lines than this and a legend hides the plot; the title says how many there are
STAT_LABELS = {"tau": "τ", "psi": "Ψ", "cmi": "CMI"}
HIDDEN_STATS = ("tau_ci_low", "tau_ci_high", "n")


# ---------------------------------------------------------------------------------------- accuracy vs x


def accuracy_vs(
    df: pd.DataFrame, x: str = "rho", metric: str = "val/top1", *, band: str = "std", ax: Axes | None = None
) -> Figure:
    """``metric`` against ``x`` (``rho``, ``sharpness_m`` or any numeric column): one line per
    (method, perturbation), the mean over the runs at each x (seeds, and anything else not split
    out: filter ``df`` first), with a shaded band: ``band="std"`` ± one std (ddof=1; none where a
    point has one run) or ``"minmax"``. SGD, which has no rho or m, is a dashed horizontal line at
    its mean. ``rho`` and ``sharpness_m`` get a log x axis (ticks at the values swept) when all
    values are positive. Works for ``metric="gen_gap"`` or any numeric column."""
    if band not in ("std", "minmax"):
        raise ValueError(f"Invalid band: {band!r} (must be 'std' or 'minmax')")
    runs = _finished(df)
    _require(runs, ["method", "perturbation", x, metric], "df")
    fig, ax = _figure(ax, (7.4, 4.2))
    swept = runs[runs["method"] != "sgd"]
    for (method, perturbation), group in _in_paper_order(swept):
        stats = _stats_by(group, x, metric)
        if stats.empty:
            continue
        style = _series_style(method, perturbation)
        ax.plot(stats.index, stats["mean"], label=_series_label(method, perturbation), **style)
        low, high = (
            (stats["mean"] - stats["std"], stats["mean"] + stats["std"]) if band == "std" else (stats["min"], stats["max"])
        )
        ax.fill_between(stats.index, low, high, color=style["color"], alpha=0.15, linewidth=0)
    _sgd_baseline(ax, runs, metric, band)
    if not ax.lines:
        raise ValueError(f"Invalid df: no numeric {metric!r} values at numeric {x!r} values")
    _x_axis(ax, x, swept[x])
    ax.set_ylabel(_axis_label(metric))
    spread = "± 1 std" if band == "std" else "min-max"
    ax.set_title(f"{_axis_label(metric, short=True)} vs {_axis_label(x, short=True)} (mean over runs, band {spread})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def _in_paper_order(runs: pd.DataFrame) -> list[tuple[tuple[object, object], pd.DataFrame]]:
    """(method, perturbation) groups in the tables' order: SAM, GSAM, ... then max before OBF."""
    methods, perturbations = list(METHOD_LABELS), list(PERTURBATION_LABELS)

    def rank(key: tuple[object, object]) -> tuple[int, str, int, str]:
        method, perturbation = str(key[0]), str(key[1])
        m = methods.index(method) if method in methods else len(methods)
        p = perturbations.index(perturbation) if perturbation in perturbations else len(perturbations)
        return m, method, p, perturbation

    groups = list(runs.groupby(["method", "perturbation"], sort=False))
    return sorted(groups, key=lambda item: rank(item[0]))


def _series_style(method: object, perturbation: object) -> dict[str, object]:
    """One colour per method, the line style and marker per perturbation, so pairs read at a glance."""
    methods = [m for m in METHOD_LABELS if m != "sgd"]
    index = methods.index(str(method)) if str(method) in methods else len(methods)
    obf = str(perturbation) == "obf"
    return {"color": f"C{index % 10}", "linestyle": "--" if obf else "-", "marker": "s" if obf else "o"}


def _sgd_baseline(ax: Axes, runs: pd.DataFrame, metric: str, band: str) -> None:
    """SGD has no rho or m: its mean is a horizontal line across the plot, with its band."""
    values = pd.to_numeric(runs.loc[runs["method"] == "sgd", metric], errors="coerce").dropna()
    if not len(values):
        return
    mean = values.mean()
    ax.axhline(mean, color="0.25", linestyle=":", linewidth=1.8, label=f"SGD (n={len(values)})")
    if len(values) > 1:
        low, high = (mean - values.std(), mean + values.std()) if band == "std" else (values.min(), values.max())
        ax.axhspan(low, high, color="0.5", alpha=0.12, linewidth=0)


def _stats_by(group: pd.DataFrame, x: str, metric: str) -> pd.DataFrame:
    values = pd.DataFrame({"x": pd.to_numeric(group[x], errors="coerce"), "y": pd.to_numeric(group[metric], errors="coerce")})
    stats = values.dropna().groupby("x")["y"].agg(["mean", "std", "min", "max", "count"])
    stats["std"] = stats["std"].fillna(0.0)  # one run: no spread to show
    return stats.sort_index()


def _x_axis(ax: Axes, x: str, values: pd.Series) -> None:
    values = np.unique(pd.to_numeric(values, errors="coerce").dropna().to_numpy(float))
    ax.set_xlabel(_axis_label(x))
    if x not in LOG_AXES or not len(values) or values.min() <= 0:
        return
    ax.set_xscale("log", base=2 if x == "sharpness_m" else 10)
    if len(values) <= 10:  # label the swept values themselves, not powers of ten
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())


# ---------------------------------------------------------------------------------------- scatter


def measure_vs_generalization(
    df: pd.DataFrame,
    measure: str,
    target: str = "gen_gap",
    *,
    hue: str | None = "perturbation",
    n_boot: int = 1000,
    seed: int = 0,
    ax: Axes | None = None,
) -> Figure:
    """Scatter of ``measure`` against ``target``, one point per run (NaN on either side left out),
    one colour per value of ``hue`` (``"perturbation"``, ``"method"``, any column, or None). The
    title carries Kendall's tau-b over all plotted runs and its bootstrap CI, from
    ``analysis.correlation.kendall_tau(n_boot=n_boot, seed=seed)``."""
    runs = _finished(df)
    _require(runs, [measure, target] + ([hue] if hue else []), "df")
    pairs = runs.assign(_m=pd.to_numeric(runs[measure], errors="coerce"), _t=pd.to_numeric(runs[target], errors="coerce"))
    pairs = pairs.dropna(subset=["_m", "_t"])
    if len(pairs) < 2:
        raise ValueError(f"Invalid df: {len(pairs)} run(s) with both {measure!r} and {target!r} (need at least 2)")
    fig, ax = _figure(ax, (5.6, 4.4))
    groups = pairs.groupby(hue, sort=True, dropna=False) if hue else [(None, pairs)]
    for value, group in groups:
        ax.scatter(group["_m"], group["_t"], s=28, alpha=0.85, label=_hue_label(hue, value))
    if hue:
        ax.legend(title=hue, fontsize="small")
    tau = kendall_tau(pairs["_m"], pairs["_t"], n_boot=n_boot, seed=seed)
    ax.set_title(tau_title(tau))
    ax.set_xlabel(_axis_label(measure))
    ax.set_ylabel(_axis_label(target))
    ax.grid(alpha=0.3)
    return fig


def tau_title(tau: dict[str, float]) -> str:
    """The scatter's title from a ``kendall_tau`` result: ``Kendall τ = 0.42 [0.10, 0.70], n = 48``."""
    ci = "" if math.isnan(tau["ci_low"]) else f" [{tau['ci_low']:.2f}, {tau['ci_high']:.2f}]"
    return f"Kendall τ = {tau['tau']:.2f}{ci}, n = {tau['n']}"


def _hue_label(hue: str | None, value: object) -> str | None:
    if hue is None:
        return None
    if hue == "method":
        return METHOD_LABELS.get(str(value), str(value))
    if hue == "perturbation":
        return PERTURBATION_LABELS.get(str(value), str(value))
    return str(value)


# ---------------------------------------------------------------------------------------- curves


def training_curves(
    history: pd.DataFrame, trial_ids: Sequence[str] | None = None, metrics: Sequence[str] | None = None
) -> Figure:
    """One subplot per metric, one line per trial, x = epoch (``analysis.load_history`` rows).

    ``metrics=None`` plots those of ``train/loss``, ``val/loss``, ``val/top1``, ``forget/flip_rate``,
    ``forget/loss_increase``, ``forget/kl`` the history has; a metric asked for by name must exist.
    ``trial_ids=None`` plots every trial. Up to 12 trials, lines are labelled by trial id and the
    method, perturbation, rho and m columns present; above, they are coloured by whichever of
    method and perturbation the history has (it leaves out a field all trials share), one legend
    entry per group, or drawn without a legend when it has neither.
    """
    if not isinstance(history, pd.DataFrame) or history.empty:
        raise ValueError("Invalid history: need a non-empty DataFrame (analysis.load_history)")
    _require(history, ["trial_id", "epoch"], "history")
    metrics = _curve_metrics(history, metrics)
    rows = _select_trials(history, trial_ids)
    n_cols = min(3, len(metrics))
    n_rows = math.ceil(len(metrics) / n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.remove()
    curves = [group.sort_values("epoch") for _, group in rows.groupby("trial_id", sort=False)]
    few = len(curves) <= MAX_LEGEND
    # Many trials are coloured by whichever of method and perturbation vary (load_history drops a fixed one).
    group_by = [] if few else [c for c in ("method", "perturbation") if c in rows.columns]
    colours, labels, legend_order = _curve_styles(curves, group_by)
    epochs = sorted(rows["epoch"].unique())
    for ax, metric in zip(axes, metrics, strict=False):
        for curve, colour, label in zip(curves, colours, labels, strict=True):
            values = pd.to_numeric(curve[metric], errors="coerce")
            marker = "." if few or len(curve) == 1 else None  # a one-point line draws nothing without a marker
            ax.plot(curve["epoch"], values, marker=marker, alpha=1.0 if few else 0.5, color=colour, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        if len(epochs) == 1:  # else matplotlib spreads fractional ticks around the one epoch
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if few or group_by:
        handles, names = axes[0].get_legend_handles_labels()
        unique = dict(zip(names, handles, strict=True))  # one entry per group when coloured by group
        unique = {name: unique[name] for name in legend_order}
        fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=min(3, len(unique)), fontsize="small")
    if not few:
        how = f", coloured by {' and '.join(group_by)}" if group_by else " (legend left out)"
        fig.suptitle(f"{len(curves)} trials{how}")
    return fig


def _curve_styles(curves: list[pd.DataFrame], group_by: list[str]) -> tuple[list[str], list[str], list[str]]:
    """A colour and a legend label per trial, and the legend's labels in order: each trial its own
    (no ``group_by``), or its group's, the groups being its values of ``group_by`` (method,
    perturbation, or both), in the tables' order."""
    if not group_by:
        labels = [_trial_label(c) for c in curves]
        return [f"C{i % 10}" for i in range(len(curves))], labels, labels
    keys = [_group_key(c, group_by) for c in curves]
    ordered = [k for k, _ in _in_paper_order(pd.DataFrame(keys, columns=["method", "perturbation"]))]
    rank = {key: i for i, key in enumerate(ordered)}
    return [f"C{rank[k] % 10}" for k in keys], [_group_label(*k) for k in keys], [_group_label(*k) for k in ordered]


def _group_key(curve: pd.DataFrame, group_by: list[str]) -> tuple[str, str]:
    """(method, perturbation) of a trial, "" for a column not grouped by; SGD has no perturbation."""
    method = str(curve["method"].iloc[0]) if "method" in group_by else ""
    perturbation = str(curve["perturbation"].iloc[0]) if "perturbation" in group_by and method != "sgd" else ""
    return method, perturbation


def _group_label(method: str, perturbation: str) -> str:
    if method == "sgd":
        return "SGD"
    if not (method and perturbation):
        return _hue_label("method", method) if method else _hue_label("perturbation", perturbation)
    return _series_label(method, perturbation)


def _curve_metrics(history: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        found = [m for m in DEFAULT_CURVES if m in history.columns and history[m].notna().any()]
        if not found:
            raise ValueError(
                f"Invalid history: none of {list(DEFAULT_CURVES)} in it (columns: {sorted(map(str, history.columns))})"
            )
        return found
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"Invalid metrics: {metrics!r} (need a non-empty list of column names, or None)")
    _require(history, list(metrics), "history")
    return list(metrics)


def _select_trials(history: pd.DataFrame, trial_ids: Sequence[str] | None) -> pd.DataFrame:
    if trial_ids is None:
        return history
    if isinstance(trial_ids, str):
        trial_ids = [trial_ids]
    known = set(history["trial_id"])
    missing = [t for t in trial_ids if t not in known]
    if missing or not trial_ids:
        raise ValueError(f"Invalid trial_ids: {missing or list(trial_ids)} not in history (trials: {sorted(map(str, known))})")
    return history[history["trial_id"].isin(trial_ids)]


def _trial_label(curve: pd.DataFrame) -> str:
    """Trial id, method/perturbation, rho and m, of those the history has; SGD perturbs nothing, so
    it shows no perturbation, rho or m, and a value that is missing (NaN) is left out."""
    first = curve.iloc[0]
    parts = [str(first["trial_id"])]
    sgd = "method" in curve.columns and str(first["method"]) == "sgd"
    perturbation = _hue_label("perturbation", first["perturbation"]) if "perturbation" in curve.columns else None
    if "method" in curve.columns:
        method = _hue_label("method", first["method"])
        parts.append(method if sgd or perturbation is None else f"{method}/{perturbation}")
    elif perturbation is not None:
        parts.append(perturbation)
    if not sgd:
        parts += [
            f"{name}={_short(first[col])}"
            for col, name in (("rho", "ρ"), ("sharpness_m", "m"))
            if col in curve.columns and not pd.isna(first[col])
        ]
    return " ".join(parts)


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float | np.number) and not isinstance(value, bool) else str(value)


# ---------------------------------------------------------------------------------------- heat map


def correlation_heatmap(corr_df: pd.DataFrame, decimals: int = 2) -> Figure:
    """Heat map of ``analysis.correlation.table`` output: measures x statistics (tau, Psi, each
    psi/<hp>, CMI; the CI bounds and n are left out), each cell annotated, on a diverging colormap
    fixed to [-1, 1] (every statistic lies in it) so 0 is white; NaN cells are grey."""
    if not isinstance(corr_df, pd.DataFrame) or corr_df.empty:
        raise ValueError("Invalid corr_df: need the non-empty DataFrame of analysis.correlation.table")
    stats = [c for c in corr_df.columns if c not in HIDDEN_STATS]
    if not stats:
        raise ValueError(f"Invalid corr_df: no statistic columns (columns: {list(corr_df.columns)})")
    values = corr_df[stats].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    n_rows, n_cols = values.shape
    width = 2.0 + 0.9 * n_cols + 0.08 * max(len(str(m)) for m in corr_df.index)
    fig = Figure(figsize=(width, 1.6 + 0.45 * n_rows), layout="constrained")
    ax = fig.subplots()
    norm = Normalize(vmin=-1.0, vmax=1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=_diverging(), norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text = "—" if np.isnan(value) else f"{value:.{decimals}f}"
        dark = not np.isnan(value) and abs(value) > 0.6
        ax.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
    ax.set_xticks(range(n_cols), [_stat_label(s) for s in stats], rotation=30, ha="left", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), [str(m) for m in corr_df.index])
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def _stat_label(stat: str) -> str:
    """``psi/sharpness_m`` -> ``ψ(m)``: short labels keep the columns narrow."""
    if stat.startswith("psi/"):
        hp = stat.removeprefix("psi/")
        return f"ψ({_axis_label(hp, short=True)})"
    return STAT_LABELS.get(stat, stat)


def _diverging() -> Colormap:
    return colormaps["RdBu_r"].with_extremes(bad="0.85")


# ---------------------------------------------------------------------------------------- saving


def save(fig: Figure, path: str | Path, dpi: int = 150) -> tuple[Path, Path]:
    """Write ``<path>.png`` and ``<path>.pdf`` (parent folders created) and return both paths. A
    trailing ``.png`` / ``.pdf`` on ``path`` is dropped; any other dot stays (``rho_0.05``)."""
    if not isinstance(fig, Figure):
        raise ValueError(f"Invalid fig: {type(fig).__name__} (need a matplotlib Figure)")
    base = Path(path)
    if base.suffix.lower() in (".png", ".pdf"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = Path(f"{base}.png"), Path(f"{base}.pdf")
    fig.savefig(png, dpi=dpi)
    fig.savefig(pdf)
    return png, pdf


# ---------------------------------------------------------------------------------------- helpers


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError("Invalid df: need a non-empty DataFrame (analysis.load_sweep)")
    if "status" not in df.columns:
        return df
    runs = df[df["status"] == DONE]
    if runs.empty:
        raise ValueError(f"Invalid df: no {DONE} trials (statuses: {sorted(df['status'].astype(str).unique())})")
    return runs


def _require(df: pd.DataFrame, names: Sequence[str], argument: str) -> None:
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ValueError(f"Invalid column(s): {missing} not in {argument} (columns: {sorted(map(str, df.columns))})")


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def _series_label(method: object, perturbation: object) -> str:
    method = METHOD_LABELS.get(str(method), str(method))
    return f"{method} ({PERTURBATION_LABELS.get(str(perturbation), str(perturbation))})"


def _axis_label(column: str, short: bool = False) -> str:
    if short:
        return {"rho": "ρ", "sharpness_m": "m", "gen_gap": "gen. gap"}.get(column, column)
    if column in AXIS_LABELS:
        return AXIS_LABELS[column]
    if column.endswith("/top1") or column.endswith("/top5"):
        return f"{column} (%)"
    return column


__all__ = ["accuracy_vs", "correlation_heatmap", "measure_vs_generalization", "save", "tau_title", "training_curves"]
