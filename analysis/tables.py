"""The paper's tables from a sweep's DataFrame: accuracy per method and perturbation, and correlations.

    table = accuracy_table(load_sweep("results/m_sharpness_study").query("rho == 0.05"))
    print(to_markdown(table))        # or to_latex(table) (booktabs), to_html(table)
    table.data                       # the numbers: method, perturbation, column, mean, std, n, best

``accuracy_table`` follows the layout of the accuracy tables of "Forget Sharpness" (Vani et al., ICML
2024): one row per method (SGD, SAM, GSAM, ASAM, RandSAM, those present), one column per
perturbation (max, OBF) under each reported metric, each cell "mean ± std (n)" over the runs that
share method and perturbation. The renderers use pandas' own facilities (``Styler.to_latex`` for
booktabs LaTeX, ``Styler.to_html``); Markdown is written here, so no ``tabulate`` is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pf_sweep.config import FIELD_NAMES

METHOD_LABELS = {"sgd": "SGD", "sam": "SAM", "gsam": "GSAM", "asam": "ASAM", "randsam": "RandSAM"}
PERTURBATION_LABELS = {"max": "max", "obf": "OBF"}
MISSING = "—"
EVAL_PREFIX, EVAL_SUFFIX = "eval/", "/top1"
TRAIN_SUBSET = "eval/train_subset/top1"  # training accuracy (gen_gap's other half), not an evaluation set
# Tune's status of a finished trial; RUNNING / ERROR trials would mix partial runs into a mean.
DONE = "TERMINATED"


@dataclass(frozen=True)
class Table:
    """A formatted table and the numbers behind it.

    ``cells``: wide DataFrame of display strings; ``best``: booleans of the same shape (cells to
    emphasise); ``data``: the numbers in long form, for tests and notebooks. ``str(table)`` is its
    Markdown, and notebooks show its HTML.
    """

    cells: pd.DataFrame
    best: pd.DataFrame
    data: pd.DataFrame

    def __str__(self) -> str:
        return to_markdown(self)

    def _repr_html_(self) -> str:
        return to_html(self)


# ---------------------------------------------------------------------------------------- accuracy


def accuracy_table(
    df: pd.DataFrame,
    metric: str = "val/top1",
    extra: Sequence[str] | None = None,
    seeds: str | None = "seed",
    *,
    mode: str = "max",
    decimals: int = 1,
) -> Table:
    """Mean ± std (n) of ``metric`` and of each extra evaluation set, per method (rows) and perturbation.

    - Runs: only ``status == "TERMINATED"`` rows when ``df`` has a ``status`` column. Every run of a
      (method, perturbation) pair enters its cell, so filter ``df`` to one setting of the other
      hyperparameters first; a cell holding two runs of the same ``seeds`` value (they must differ
      in something else) triggers a warning naming the config columns that vary in it.
    - SGD has no perturbation: all its runs form one cell, shown under ``max`` (the unperturbed
      baseline column), and its other perturbation cells read "—".
    - Columns: ``metric``, then one per extra set: ``extra`` names sets (``"<dataset>:<split>"``,
      read from ``eval/<set>/top1``) or columns; by default every ``eval/<set>/top1`` column of
      ``df`` except ``eval/train_subset/top1`` (training accuracy). Pass ``extra=[]`` for the metric alone.
    - Cells: std with ddof=1; a cell of one run reads "mean ± — (1)" (std NaN in ``data``); NaN
      values are left out of their column's cells; an empty cell reads "—".
    - Best: in each column the cell(s) with the highest mean (``mode="min"``: the lowest, e.g. for
      ``gen_gap``), compared as displayed (``decimals``), so equal-looking cells are marked alike.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"Invalid mode: {mode!r} (must be 'max' or 'min')")
    runs = _finished(df)
    _require(runs, ["method", "perturbation", metric])
    if seeds is not None and seeds not in runs.columns:
        raise ValueError(f"Invalid seeds: {seeds!r} is not a column of df (pass seeds=None to skip the seed check)")
    columns = {_column_label(metric): metric, **_extra_columns(runs, metric, extra)}
    runs = runs.assign(perturbation=np.where(runs["method"] == "sgd", "max", runs["perturbation"]))
    if seeds is not None:
        _warn_pooled(runs, seeds, list(columns.values()))
    data = _cell_stats(runs, columns)
    data["best"] = _best_flags(data, mode, decimals)
    cells, best = _wide(data, list(columns), decimals)
    return Table(cells=cells, best=best, data=data)


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"Invalid df: {type(df).__name__} (need a pandas DataFrame, e.g. from analysis.load_sweep)")
    if "status" not in df.columns:
        runs = df
    else:
        runs = df[df["status"] == DONE]
        if runs.empty and not df.empty:
            raise ValueError(f"Invalid df: no {DONE} trials (statuses: {sorted(df['status'].astype(str).unique())})")
    if runs.empty:
        raise ValueError("Invalid df: it has no rows")
    return runs


def _require(df: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ValueError(f"Invalid column(s): {missing} not in df (columns: {sorted(map(str, df.columns))})")


def _column_label(column: str) -> str:
    """``eval/<set>/top1`` -> ``<set>``; any other column keeps its name."""
    if column.startswith(EVAL_PREFIX) and column.endswith(EVAL_SUFFIX) and len(column) > len(EVAL_PREFIX + EVAL_SUFFIX):
        return column[len(EVAL_PREFIX) : -len(EVAL_SUFFIX)]
    return column


def _extra_columns(df: pd.DataFrame, metric: str, extra: Sequence[str] | None) -> dict[str, str]:
    """label -> column of each extra evaluation set (see ``accuracy_table``)."""
    if extra is None:
        found = [c for c in df.columns if isinstance(c, str) and _column_label(c) != c]
        return {_column_label(c): c for c in found if c not in (metric, TRAIN_SUBSET)}
    if isinstance(extra, str):
        raise ValueError(f"Invalid extra: {extra!r} (need a list of set or column names, e.g. [{extra!r}])")
    out = {}
    for name in extra:
        column = f"{EVAL_PREFIX}{name}{EVAL_SUFFIX}" if f"{EVAL_PREFIX}{name}{EVAL_SUFFIX}" in df.columns else name
        if column not in df.columns:
            sets = sorted(_column_label(c) for c in df.columns if isinstance(c, str) and _column_label(c) != c)
            raise ValueError(f"Invalid extra: {name!r} is neither an evaluation set of df (sets: {sets}) nor a column of it")
        out[_column_label(column)] = column
    return out


def _warn_pooled(runs: pd.DataFrame, seeds: str, metrics: list[str]) -> None:
    for (method, perturbation), group in runs.groupby(["method", "perturbation"], sort=False):
        if not group[seeds].duplicated().any():
            continue
        fields = [c for c in group.columns if c in FIELD_NAMES and c not in (seeds, *metrics)]
        varying = [c for c in fields if group[c].astype(str).nunique() > 1]
        warnings.warn(
            f"cell {_method_label(method)}/{_perturbation_label(perturbation)} pools several runs with the same "
            f"{seeds} (they differ in {varying or 'columns that are not config fields'}): "
            "filter df to one setting first",
            stacklevel=3,
        )


def _cell_stats(runs: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Long form: one row per (method, perturbation, column label) with at least one value."""
    rows = []
    for (method, perturbation), group in runs.groupby(["method", "perturbation"], sort=False):
        for label, column in columns.items():
            values = pd.to_numeric(group[column], errors="coerce").dropna().to_numpy(float)
            if not len(values):
                continue
            std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            rows.append(
                {
                    "method": _method_label(method),
                    "perturbation": _perturbation_label(perturbation),
                    "column": label,
                    "mean": float(np.mean(values)),
                    "std": std,
                    "n": len(values),
                }
            )
    if not rows:
        raise ValueError(f"Invalid df: no numeric values in {list(columns.values())}")
    data = pd.DataFrame(rows)
    order = {
        "method": _order(data["method"], METHOD_LABELS.values()),
        "perturbation": _order(data["perturbation"], PERTURBATION_LABELS.values()),
    }
    order["column"] = list(columns)
    for key, levels in order.items():
        data[key] = pd.Categorical(data[key], categories=levels, ordered=True)
    return data.sort_values(["column", "method", "perturbation"]).reset_index(drop=True)


def _method_label(method: object) -> str:
    return METHOD_LABELS.get(str(method), str(method))


def _perturbation_label(perturbation: object) -> str:
    return PERTURBATION_LABELS.get(str(perturbation), str(perturbation))


def _order(present: pd.Series, known: Sequence[str]) -> list[str]:
    """The known labels present, in their order, then any others alphabetically."""
    seen = set(present)
    return [k for k in known if k in seen] + sorted(seen - set(known))


def _best_flags(data: pd.DataFrame, mode: str, decimals: int) -> pd.Series:
    shown = data["mean"].round(decimals)
    target = shown.groupby(data["column"], observed=True).transform("max" if mode == "max" else "min")
    return shown == target


def _wide(data: pd.DataFrame, labels: list[str], decimals: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows = method, columns = (metric or set, perturbation); every cell present, "—" where no run."""
    methods = list(data["method"].cat.categories)
    perturbations = list(data["perturbation"].cat.categories)
    columns = pd.MultiIndex.from_product([labels, perturbations], names=["column", "perturbation"])
    cells = pd.DataFrame(MISSING, index=pd.Index(methods, name="method"), columns=columns)
    best = pd.DataFrame(False, index=cells.index, columns=columns)
    for row in data.itertuples(index=False):
        cells.loc[row.method, (row.column, row.perturbation)] = _mean_std(row.mean, row.std, row.n, decimals)
        best.loc[row.method, (row.column, row.perturbation)] = bool(row.best)
    return cells, best


def _mean_std(mean: float, std: float, n: int, decimals: int) -> str:
    spread = MISSING if math.isnan(std) else f"{std:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {spread} ({n})"


# ---------------------------------------------------------------------------------------- correlation


def correlation_table(corr_df: pd.DataFrame, decimals: int = 2) -> Table:
    """``analysis.correlation.table`` output as a table: one row per measure, columns ``tau [95% CI]``
    ("0.42 [0.10, 0.70]"; the interval's level is the one the table was computed with, 95% by
    default), ``n``, ``Psi``, one ``psi/<hp>`` per hyperparameter, and ``CMI``. NaN reads "—". No
    cell is emphasised: which sign is "good" depends on the measure.
    """
    if not isinstance(corr_df, pd.DataFrame) or corr_df.empty:
        raise ValueError("Invalid corr_df: need the non-empty DataFrame of analysis.correlation.table")
    _require(corr_df, ["tau", "tau_ci_low", "tau_ci_high", "psi", "cmi"])
    parts = [c for c in corr_df.columns if isinstance(c, str) and c.startswith("psi/")]
    cells = pd.DataFrame(index=corr_df.index.astype(str))
    cells["tau [95% CI]"] = [
        _tau_ci(t, lo, hi, decimals) for t, lo, hi in corr_df[["tau", "tau_ci_low", "tau_ci_high"]].itertuples(index=False)
    ]
    if "n" in corr_df.columns:
        cells["n"] = [MISSING if pd.isna(v) else str(int(v)) for v in corr_df["n"]]
    for source, label in [("psi", "Psi"), *((p, p) for p in parts), ("cmi", "CMI")]:
        cells[label] = [_number(v, decimals) for v in corr_df[source]]
    cells.index.name = corr_df.index.name or "measure"
    best = pd.DataFrame(False, index=cells.index, columns=cells.columns)
    return Table(cells=cells, best=best, data=corr_df.copy())


def _number(value: float, decimals: int) -> str:
    return MISSING if pd.isna(value) else f"{float(value):.{decimals}f}"


def _tau_ci(tau: float, low: float, high: float, decimals: int) -> str:
    if pd.isna(tau):
        return MISSING
    if pd.isna(low) or pd.isna(high):
        return _number(tau, decimals)
    return f"{_number(tau, decimals)} [{_number(low, decimals)}, {_number(high, decimals)}]"


# ---------------------------------------------------------------------------------------- renderers


def _flat_header(column: object) -> str:
    """One header line per column: ``val/top1 (max)`` for the accuracy table's two levels."""
    if isinstance(column, tuple):
        return f"{column[0]} ({column[1]})"
    return str(column)


def to_markdown(table: Table) -> str:
    """A GitHub pipe table, best cells in ``**bold**``; ``|`` inside a cell is escaped."""
    _check_table(table)
    cells, best = table.cells, table.best

    def esc(text: object) -> str:
        return str(text).replace("|", "\\|")

    header = [esc(cells.index.name or ""), *(esc(_flat_header(c)) for c in cells.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *["---:"] * len(cells.columns)]) + "|"]
    for label, row in cells.iterrows():
        marked = [f"**{esc(v)}**" if best.loc[label, c] else esc(v) for c, v in row.items()]
        lines.append("| " + " | ".join([esc(label), *marked]) + " |")
    return "\n".join(lines) + "\n"


def _latex_cell(text: str) -> str:
    """A cell's text in LaTeX (the cells hold only numbers, ±, — and brackets)."""
    return text.replace("±", r"$\pm$").replace(MISSING, "---")


def to_latex(table: Table, caption: str | None = None, label: str | None = None) -> str:
    """booktabs LaTeX (``\\toprule``, ``\\midrule``, ``\\bottomrule``) by pandas' ``Styler.to_latex``;
    best cells in ``\\textbf``, labels escaped; the two-level header of the accuracy table becomes a
    ``\\multicolumn`` row. Needs ``\\usepackage{booktabs}`` (and ``multirow`` for the header)."""
    _check_table(table)
    body = table.cells.copy()
    for column in body.columns:
        body[column] = [
            rf"\textbf{{{_latex_cell(v)}}}" if b else _latex_cell(v)
            for v, b in zip(body[column], table.best[column], strict=True)
        ]
    styler = body.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    styler = styler.hide(axis="index", names=True).hide(axis="columns", names=True)  # level names add header rows
    return styler.to_latex(
        hrules=True,
        column_format="l" + "r" * len(body.columns),
        multicol_align="c",
        caption=caption,
        label=label,
    )


def to_html(table: Table) -> str:
    """An HTML table by pandas' ``Styler.to_html``: best cells bold, text escaped."""
    _check_table(table)
    styler = table.cells.style.format(escape="html").format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    styler = styler.apply(lambda _: np.where(table.best.to_numpy(), "font-weight: bold", ""), axis=None)
    styler = styler.hide(axis="index", names=True).hide(axis="columns", names=True)
    styler = styler.set_table_styles([{"selector": "td", "props": "text-align: right; padding: 0 0.6em;"}])
    return styler.to_html()


def _check_table(table: object) -> None:
    if not isinstance(table, Table):
        raise ValueError(f"Invalid table: {type(table).__name__} (need the Table of accuracy_table or correlation_table)")


__all__ = ["Table", "accuracy_table", "correlation_table", "to_html", "to_latex", "to_markdown"]
