"""``python -m analysis report SWEEP_DIR [SWEEP_DIR ...]``: write a sweep's report (see analysis.report).

``python -m analysis hessian SWEEP_DIR``: the top Hessian eigenvalue of every finished trial's last
checkpoint. ``--protocol paper`` measures as the paper's release does: on the first 8,192 training
images in TFDS order, in batches of 256, through the evaluation transform resized bilinearly, with
the trial's loss unsmoothed (CE for its ResNets, BCE summed over classes for its ViTs), in eval mode.
"""

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
    hessian = commands.add_parser("hessian", help="the top Hessian eigenvalue of every finished trial (on Ray)")
    hessian.add_argument("sweep", metavar="SWEEP_DIR")
    hessian.add_argument("--protocol", choices=sorted(HESSIAN_PROTOCOLS), default="paper")
    hessian.add_argument("--address", help="Ray cluster (default: a local Ray)")
    args = parser.parse_args(argv)
    if args.command == "hessian":
        return _hessian(args, parser)

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


# --protocol -> measure_sweep's settings. "paper": the release's compute_hessian scripts.
HESSIAN_PROTOCOLS = {
    "paper": {"data": "train[:8192]", "batch_size": 256, "interpolation": "bilinear"},
    "quick": {"data": "train[:1024]", "batch_size": 128, "interpolation": None},
}


def _hessian(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from analysis.measure import measure_sweep

    try:
        frame = measure_sweep(args.sweep, measures=["hessian_top"], address=args.address, **HESSIAN_PROTOCOLS[args.protocol])
    except ValueError as err:
        parser.exit(2, f"python -m analysis: error: {err}\n")
    print(frame[["trial_id", "value", "error", "seconds"]].rename(columns={"value": "hessian_top"}).to_string(index=False))
    return 1 if frame["error"].notna().any() else 0


if __name__ == "__main__":
    sys.exit(main())
