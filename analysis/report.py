"""``python -m analysis report SWEEP_DIR ...``: a sweep's tables, figures and correlations as one HTML page.

Writes ``<first sweep>/report/`` (or ``--out``): ``index.html`` with the tables inline, every figure,
the sweep's settings and, under each figure, the Python that remakes it; the tables as ``.md`` and
``.tex``; the figures as ``.png`` and ``.pdf``; the tidy data as CSV. A sweep with failed or
unfinished trials still gets a report, which names them. Sharpness measures (``--measures``) run as
Ray tasks through ``analysis.measure``; without them the report needs no Ray at all.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import correlation, forgetting, plots, tables
from analysis.results import load_history, load_sweep, varying_fields

TARGET = "gen_gap"
# Config fields that are not hyperparameters of a correlation (Jiang et al. average over seeds).
NOT_HYPERPARAMS = {"seed", "data_dir", "eval_sets", "cpus_per_worker", "gpus_per_worker", "use_gpu", "num_workers"}


@dataclass
class Section:
    title: str
    html: str
    files: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What ``build`` wrote: the page, every file, and the numbers for a summary line."""

    index: Path
    files: list[Path]
    counts: dict[str, int]
    failed: dict[str, str]
    unfinished: list[str]


def _hyperparams(done: pd.DataFrame) -> list[str]:
    return [name for name in varying_fields(done) if name not in NOT_HYPERPARAMS]


def _load_snippet(sweeps_arg: str) -> str:
    """The first lines of every "remake" snippet: imports and the sweep loaded as ``trials``."""
    return f"from analysis import load_sweep, load_history, plots, tables, correlation\ntrials = load_sweep({sweeps_arg})\n"


def _figure_block(out: Path, name: str, fig, remake: str, caption: str) -> tuple[str, list[str]]:
    png, pdf = plots.save(fig, out / name)
    block = (
        f'<figure><a href="{png.name}"><img src="{png.name}" alt="{html.escape(caption)}"></a>'
        f'<figcaption>{html.escape(caption)} · <a href="{pdf.name}">PDF</a>'
        f"<details><summary>remake</summary><pre>{html.escape(remake)}</pre></details></figcaption></figure>"
    )
    return block, [png.name, pdf.name]


def _table_block(out: Path, name: str, table: tables.Table, caption: str) -> tuple[str, list[str]]:
    (out / f"{name}.md").write_text(tables.to_markdown(table) + "\n")
    (out / f"{name}.tex").write_text(tables.to_latex(table, caption=caption, label=f"tab:{name}"))
    block = (
        f"<p>{html.escape(caption)} (<a href='{name}.md'>Markdown</a>, <a href='{name}.tex'>LaTeX</a>)</p>{tables.to_html(table)}"
    )
    return block, [f"{name}.md", f"{name}.tex"]


def build(
    sweep_dirs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    measures: Sequence[str] = (),
    rho_eval: Sequence[float] = (),
    data: str = "train[:1024]",
    address: str | None = None,
    claims: bool = False,
) -> Report:
    """Write the report of ``sweep_dirs`` and return what it wrote. Raises ValueError for a non-sweep."""
    paths = [str(p) for p in sweep_dirs]
    trials = load_sweep(paths)  # ValueError naming what is missing, before anything is written
    history = load_history(paths)
    out_dir = Path(out) if out is not None else Path(paths[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sweeps_arg = repr(paths[0]) if len(paths) == 1 else repr(paths)

    done = trials[trials["status"] == "TERMINATED"].copy()
    failed = {r.trial_id: str(r.error) for r in trials.itertuples() if r.status == "ERROR"}
    unfinished = [r.trial_id for r in trials.itertuples() if r.status in ("RUNNING", "PENDING")]
    counts = {"trials": len(trials), "finished": len(done), "failed": len(failed), "unfinished": len(unfinished)}
    sections: list[Section] = [_settings_section(paths), _status_section(counts, failed, unfinished)]
    files: list[str] = []

    if not history.empty:
        agg = forgetting.summarize_trials(history)
        done = done.merge(agg, on=["sweep", "trial_id"], how="left")
    measure_columns: list[str] = []
    if measures and not done.empty:
        from analysis import measure

        measured = measure.measure_sweep(
            paths[0] if len(paths) == 1 else paths, measures=list(measures), rho_eval=list(rho_eval), data=data, address=address
        )
        measured.to_csv(out_dir / "measures.csv", index=False)
        files.append("measures.csv")
        wide = measure.wide(measured)
        measure_columns = [c for c in wide.columns if c not in ("sweep", "trial_id")]
        done = done.merge(wide, on=["sweep", "trial_id"], how="left")

    trials.to_csv(out_dir / "trials.csv", index=False)
    history.to_csv(out_dir / "history.csv", index=False)
    done.to_csv(out_dir / "finished_trials.csv", index=False)
    files += ["trials.csv", "history.csv", "finished_trials.csv"]

    if not done.empty:
        hyper = _hyperparams(done)
        sections.append(_accuracy_section(out_dir, done, hyper, files))
        sections.append(_figures_section(out_dir, done, history, hyper, sweeps_arg, files))
        candidates = [c for c in done.columns if c.startswith("forget/") and c.endswith("/mean")] + measure_columns
        if TARGET in done and candidates and len(done) >= 3:
            sections.append(_correlation_section(out_dir, done, candidates, hyper, sweeps_arg, files))
    if claims and not done.empty:
        sections.append(_claims_section(out_dir, done, measure_columns, _hyperparams(done), files))
    sections.append(
        Section("Data", "<ul>" + "".join(f'<li><a href="{f}">{f}</a></li>' for f in files if f.endswith(".csv")) + "</ul>")
    )
    index = out_dir / "index.html"
    index.write_text(_page(paths, sections))
    return Report(index=index, files=[out_dir / f for f in files], counts=counts, failed=failed, unfinished=unfinished)


def _settings_section(paths: list[str]) -> Section:
    from pf_sweep.sweep import read_sweep

    parts = []
    for path in paths:
        meta = read_sweep(path)
        rows = {
            "space": meta.get("space"),
            "metric": f"{meta.get('metric')} ({meta.get('mode')})",
            "planned trials": meta.get("trials"),
            "settings": json.dumps(meta.get("settings", {}), sort_keys=True),
            "fixed config": json.dumps(meta.get("base", {}), sort_keys=True),
            "pf-sweep version": meta.get("version"),
        }
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows.items())
        parts.append(f"<h3>{html.escape(path)}</h3><table class='kv'>{cells}</table>")
    return Section("Sweep settings", "".join(parts))


def _status_section(counts: dict[str, int], failed: dict[str, str], unfinished: list[str]) -> Section:
    text = (
        f"<p>{counts['trials']} trials: {counts['finished']} finished, {counts['failed']} failed, "
        f"{counts['unfinished']} unfinished. Tables and figures use the finished ones.</p>"
    )
    if failed:
        text += "<ul>" + "".join(f"<li>failed <code>{t}</code>: {html.escape(e)}</li>" for t, e in failed.items()) + "</ul>"
    if unfinished:
        text += "<p>Unfinished: " + ", ".join(f"<code>{t}</code>" for t in unfinished) + "</p>"
    return Section("Trials", text)


def _accuracy_section(out: Path, done: pd.DataFrame, hyper: list[str], files: list[str]) -> Section:
    pooled = [h for h in hyper if h not in ("method", "perturbation")]
    caption = "Validation top-1, mean ± std (n) per method and perturbation"
    if pooled:
        caption += f", pooled over {', '.join(pooled)} (see the figures for each setting)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pooling over settings is said in the caption
        table = tables.accuracy_table(done)
    block, names = _table_block(out, "accuracy", table, caption)
    files += names
    return Section("Accuracy", block)


def _figures_section(
    out: Path, done: pd.DataFrame, history: pd.DataFrame, hyper: list[str], sweeps_arg: str, files: list[str]
) -> Section:
    load = _load_snippet(sweeps_arg)
    blocks = []
    for x in ("rho", "sharpness_m"):
        if x not in hyper:
            continue
        for metric in ("val/top1", TARGET):
            if metric not in done:
                continue
            name = f"{metric.replace('/', '_')}_vs_{x}"
            fig = plots.accuracy_vs(done, x=x, metric=metric)
            remake = f'{load}plots.save(plots.accuracy_vs(trials, x="{x}", metric="{metric}"), "{name}")'
            block, names = _figure_block(out, name, fig, remake, f"{metric} vs {x}")
            blocks.append(block)
            files += names
    if not history.empty:
        fig = plots.training_curves(history)
        remake = f'{load}plots.save(plots.training_curves(load_history({sweeps_arg})), "training_curves")'
        block, names = _figure_block(out, "training_curves", fig, remake, "Training curves of every trial")
        blocks.append(block)
        files += names
    return Section("Figures", "".join(blocks) or "<p>No swept rho or m to plot against.</p>")


def _correlation_section(
    out: Path, done: pd.DataFrame, measures: list[str], hyper: list[str], sweeps_arg: str, files: list[str]
) -> Section:
    load = _load_snippet(sweeps_arg)
    usable = [m for m in measures if done[m].notna().sum() >= 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-valued hyperparameters are left out, as documented
        corr = correlation.table(done, measures=usable, target=TARGET, hyperparams=hyper)
    corr.to_csv(out / "correlation.csv")
    files.append("correlation.csv")
    table_block, names = _table_block(
        out, "correlation", tables.correlation_table(corr), f"Rank correlation of each measure with {TARGET}"
    )
    files += names
    heat, names = _figure_block(
        out,
        "correlation_heatmap",
        plots.correlation_heatmap(corr),
        f"{load}# done = the finished trials joined with their measures (finished_trials.csv)\n"
        f'done = __import__("pandas").read_csv("finished_trials.csv")\n'
        f"corr = correlation.table(done, measures={usable!r}, target={TARGET!r}, hyperparams={hyper!r})\n"
        'plots.save(plots.correlation_heatmap(corr), "correlation_heatmap")',
        "Correlation table as a heat map",
    )
    files += names
    scatters = []
    for m in usable:
        name = "scatter_" + m.replace("/", "_").replace("@", "_at_").replace("=", "")
        fig = plots.measure_vs_generalization(done, m, target=TARGET)
        block, names = _figure_block(
            out,
            name,
            fig,
            f'done = __import__("pandas").read_csv("finished_trials.csv")\n'
            f'from analysis import plots\nplots.save(plots.measure_vs_generalization(done, "{m}", target="{TARGET}"), "{name}")',
            f"{m} vs {TARGET}",
        )
        scatters.append(block)
        files += names
    return Section("Forgetting and sharpness vs generalization", table_block + heat + "".join(scatters))


def _claims_section(out: Path, done: pd.DataFrame, flatness: list[str], hyper: list[str], files: list[str]) -> Section:
    from analysis import claims

    accuracy = ["val/top1", *[c for c in done.columns if c.startswith("eval/") and c != "eval/train_subset/top1"]]
    findings = claims.obf_vs_max(done, accuracy) + claims.m_trend(done)
    frame = claims.findings_frame(findings)
    frame.to_csv(out / "claims.csv", index=False)
    files.append("claims.csv")
    forget = [c for c in done.columns if c.startswith("forget/") and c.endswith("/mean")]
    side = claims.forgetting_vs_flatness(done, forget, flatness, hyper)
    parts = [
        "<p>Each claim of the paper, answered from this sweep with 95% bootstrap intervals. A claim whose "
        "interval spans zero is not answered at this scale.</p>"
    ]
    if not frame.empty:
        shown = frame.assign(
            estimate=frame["estimate"].map("{:.3g}".format),
            CI=[f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(frame["ci_low"], frame["ci_high"], strict=True)],
        )[["claim", "statistic", "estimate", "CI", "n", "verdict"]]
        parts.append(shown.to_html(index=False, escape=True))
    parts.append("<h3>3. Forgetting vs flatness as predictors of the generalization gap</h3>")
    if side.empty:
        parts.append("<p>Not enough measured runs.</p>")
    else:
        side.to_csv(out / "claim3_forgetting_vs_flatness.csv")
        files.append("claim3_forgetting_vs_flatness.csv")
        parts.append(side.round(3).to_html(escape=True))
        parts.append(f"<p><strong>{html.escape(claims.claim3_verdict(side))}</strong></p>")
    return Section("The paper's claims, measured", "".join(parts))


def _page(paths: list[str], sections: list[Section]) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "figure{display:inline-block;margin:1em;max-width:520px;vertical-align:top}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:85%}table.kv code{white-space:pre-wrap}"
    )
    title = "pf-sweep report: " + ", ".join(Path(p).name for p in paths)
    body = "".join(f"<h2>{html.escape(s.title)}</h2>{s.html}" for s in sections)
    note = "<p>Each figure's <em>remake</em> snippet runs from this folder.</p>"
    body = note + body
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
