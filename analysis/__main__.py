"""``python -m analysis report SWEEP_DIR [SWEEP_DIR ...]``: write a sweep's report (see analysis.report)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Analyse pf-sweep sweeps.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="tables, figures and correlations of sweeps as an HTML page")
    report.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="sweep directories or URIs")
    report.add_argument("--out", help="where to write (default: <first sweep>/report)")
    report.add_argument("--measures", default="", help="comma-separated sharpness measures to run on Ray (analysis.measure)")
    report.add_argument("--rho-eval", default="", help="comma-separated rho grid for the rho-taking measures")
    report.add_argument("--data", default="train[:1024]", help="the fixed data every checkpoint is measured on")
    report.add_argument("--address", help="Ray cluster for the measures (default: a local Ray)")
    report.add_argument("--claims", action="store_true", help="add a section answering each of the paper's claims")
    args = parser.parse_args(argv)

    from analysis.report import build

    try:
        measures = [m for m in args.measures.split(",") if m]
        rho_eval = [float(r) for r in args.rho_eval.split(",") if r]
        result = build(
            args.sweeps,
            out=args.out,
            measures=measures,
            rho_eval=rho_eval,
            data=args.data,
            address=args.address,
            claims=args.claims,
        )
    except ValueError as err:
        parser.exit(2, f"python -m analysis: error: {err}\n")
    c = result.counts
    print(f"{c['trials']} trials: {c['finished']} finished, {c['failed']} failed, {c['unfinished']} unfinished")
    for trial_id, error in result.failed.items():
        print(f"  failed {trial_id}: {error}")
    print(f"report: {result.index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
