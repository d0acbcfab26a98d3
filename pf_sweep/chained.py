"""Chained sweeps: a run that starts from the final checkpoint of a named run of an earlier sweep.

The paper fine-tunes on CIFAR from its ImageNet runs' last checkpoints. A fine-tuning preset names
each source as (space, run): ``("paper_rn50", "sam_max")``. The user names the earlier sweeps by
directory (``--from-sweep results/paper_rn50``); each sweep's ``sweep.json`` says which space it ran,
and each checkpoint's ``config.json`` which run it belongs to. Every source is looked up before Ray
starts, and a missing or unfinished one is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pf_sweep.checkpoint import CONFIG_FILE
from pf_sweep.run_dir import RunDirectory


def finished_runs(sweep_path: str) -> tuple[str, dict[str, str | None]]:
    """(the sweep's space, {run name: its last epoch's checkpoint directory, None if unfinished})."""
    from pf_sweep.sweep import read_sweep

    if "://" in sweep_path:
        raise ValueError(f"Invalid --from-sweep {sweep_path!r}: a source sweep must be a directory every worker reads")
    if not Path(sweep_path, "sweep.json").is_file():
        raise ValueError(f"Invalid --from-sweep {sweep_path!r}: not a sweep directory (it has no sweep.json)")
    meta = read_sweep(sweep_path)
    found: dict[str, str | None] = {}
    for run_dir in sorted(Path(sweep_path, "runs").glob("train-*")):
        names = RunDirectory(run_dir).checkpoints()
        if not names:
            continue
        config = json.loads((run_dir / names[-1] / CONFIG_FILE).read_text())
        run, epochs = config.get("run_name"), config.get("epochs")
        if run is None:
            continue
        last = run_dir / names[-1]
        done = last.name == f"checkpoint_{int(epochs) - 1:06d}"
        if done or run not in found:  # a finished trial of the run wins over an unfinished one
            found[run] = str(last.resolve()) if done else found.get(run)
    return meta.get("space", "?"), found


def source_checkpoints(sources: dict[str, tuple[str, str]], sweeps: list[str]) -> dict[str, str]:
    """{run: checkpoint directory} for every run in ``sources`` ({run: (space, source run)})."""
    by_space: dict[str, tuple[str, dict[str, str | None]]] = {}
    for path in sweeps:
        space, runs = finished_runs(path)
        by_space[space] = (path, runs)
    out = {}
    for run, (space, source) in sources.items():
        if space not in by_space:
            given = ", ".join(f"{p} ({s})" for s, (p, _) in by_space.items()) or "none"
            raise ValueError(
                f"Invalid --from-sweep: run {run!r} starts from {space}'s {source!r}, but no sweep of space {space} "
                f"was given (given: {given}); add --from-sweep <storage>/{space}"
            )
        path, runs = by_space[space]
        if source not in runs:
            raise ValueError(f"Invalid --from-sweep: sweep {path} has no run {source!r} (it has: {', '.join(runs) or 'none'})")
        if runs[source] is None:
            raise ValueError(f"Invalid --from-sweep: run {source!r} of sweep {path} has not finished; resume it first")
        out[run] = runs[source]
    return out
