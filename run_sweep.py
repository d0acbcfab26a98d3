#!/usr/bin/env python
"""Launch (or resume) a pf-sweep sweep on the embedded local Ray or a Ray cluster.

    python run_sweep.py                               # digits_cpu on local Ray
    python run_sweep.py --space digits_cpu --num-samples 12 --set epochs=6
    python run_sweep.py --dry-run                     # show what would run, start nothing
    python run_sweep.py --name my-sweep --resume      # continue an interrupted sweep

Every argument is checked before Ray starts; a bad one exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="digits_cpu", help="a shipped space name or a .py file defining SPACE")
    p.add_argument("--runs", help="a paper_* preset's named runs to run, comma-separated (default: all of them)")
    p.add_argument(
        "--from-sweep",
        dest="from_sweeps",
        action="append",
        default=[],
        metavar="DIR",
        help="an earlier sweep a chained preset's runs start from (repeatable: paper_cifar*_finetune need paper_rn50 "
        "and/or paper_vits32)",
    )
    p.add_argument(
        "--search",
        metavar="FIELDS",
        help="search these fields (comma-separated: rho, sharpness_m, obf_gamma, gsam_alpha, lr, weight_decay) with "
        "Optuna around the one preset run --runs names (default budget 16 trials)",
    )
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's budget)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's, capped by CPUs)")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--storage", default="results", help="directory or URI (s3://, gs://) holding all sweeps")
    p.add_argument("--name", help="sweep name (default: the space name)")
    p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial (each resumes its checkpoint)")
    p.add_argument(
        "--optuna-storage", metavar="URL", help="SQLAlchemy URL of the Optuna study (default: sqlite optuna.db in the sweep)"
    )
    p.add_argument(
        "--log",
        dest="loggers",
        action="append",
        default=[],
        choices=["tensorboard", "wandb", "mlflow"],
        help="also log trials to this tracker (repeatable; its package must be installed)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a fixed TrialConfig field of the space (repeatable)",
    )
    p.add_argument(
        "--executor",
        choices=["auto", "workers"],
        default="auto",
        help="auto: one-worker trials train inside their reused Tune trial actor (fast); "
        "workers: a Ray Train worker group per trial (multi-worker trials always do)",
    )
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and Tune's trial tables")
    p.add_argument("--resume", action="store_true", help="continue the sweep <storage>/<name>")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and start nothing")
    p.add_argument("--list-spaces", action="store_true")
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Everything Ray will need, validated now: (space, settings, name)."""
    import search_spaces
    from pf_sweep import preflight
    from pf_sweep.config import parse_field_value
    from pf_sweep.sweep import SweepSettings, trial_base

    try:
        space = search_spaces.get(args.space)
        if args.runs is not None:
            if args.resume:
                raise ValueError("--runs applies at launch; a resumed sweep keeps the runs it started with")
            space = space.with_runs([r.strip() for r in args.runs.split(",") if r.strip()])
        if args.from_sweeps and args.resume:
            raise ValueError("--from-sweep applies at launch; a resumed sweep keeps the checkpoints it started from")
        if getattr(space, "sources", None) and not args.resume:
            if not args.from_sweeps:
                needed = sorted({source_space for source_space, _ in space.sources.values()})
                raise ValueError(
                    f"Space {space.name} fine-tunes earlier runs: name their sweeps with --from-sweep "
                    f"(of space {' and '.join(needed)}; --runs picks a subset)"
                )
            space = space.from_sweeps(args.from_sweeps)
        elif args.from_sweeps:
            space.from_sweeps(args.from_sweeps)  # raises: this space starts from no earlier sweep
        if args.search is not None:
            if args.resume:
                raise ValueError("--search applies at launch; a resumed sweep keeps the space it started with")
            from search_spaces.base import search_around

            fields = [f.strip() for f in args.search.split(",") if f.strip()]
            workers = args.workers_per_trial or space.workers_per_trial
            space = search_around(space, fields, workers=workers, num_samples=args.num_samples or 16)
        overrides = {}
        for item in args.overrides:
            if "=" not in item:
                raise ValueError(f"Invalid --set {item!r} (expected FIELD=VALUE)")
            key, value = item.split("=", 1)
            overrides[key.strip()] = parse_field_value(key.strip(), value)
        for option in ("num_samples", "max_concurrent", "workers_per_trial"):
            value = getattr(args, option)
            if value is not None and value < 1:
                raise ValueError(f"Invalid --{option.replace('_', '-')}: {value} (must be >= 1)")
        if args.max_failures < 0:
            raise ValueError(f"Invalid --max-failures: {args.max_failures} (must be >= 0)")
        settings = SweepSettings(
            num_samples=args.num_samples or space.num_samples,
            max_concurrent=args.max_concurrent or space.max_concurrent,
            seed=args.seed,
            scheduler=args.scheduler,
            workers_per_trial=args.workers_per_trial or space.workers_per_trial,
            cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else space.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker if args.gpus_per_worker is not None else space.gpus_per_worker,
            overrides=overrides,
            max_failures=args.max_failures,
            optuna_storage=args.optuna_storage,
            loggers=list(dict.fromkeys(args.loggers)),
            executor=args.executor,
            verbose=args.verbose,
        )
        settings.validate()
        if args.resume and (args.loggers or args.optuna_storage):
            raise ValueError("--log and --optuna-storage apply at launch; a resumed sweep keeps the ones it started with")
        name = args.name or space.name
        if args.resume:  # the sweep keeps its stored config; main() checks that it is a sweep
            preflight.check_address(args.address)
        else:  # storage, this machine's CPUs and GPUs, data, pretrained_path, the cluster's address
            configs = preflight.planned_configs(space, settings, trial_base(space, settings))
            preflight.check_sweep(space, settings, storage_path=args.storage, address=args.address, configs=configs, warn=_warn)
        if args.address is None:
            per_trial = settings.workers_per_trial * settings.cpus_per_worker
            settings.max_concurrent = max(1, min(settings.max_concurrent, int((os.cpu_count() or 1) // per_trial)))
        if not (args.resume or args.dry_run) and settings.optuna_storage and space.suggest is not None:
            from pf_sweep.sweep import open_study_storage

            open_study_storage(settings.optuna_storage, name, ours=False)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"run_sweep.py: error: {err}\n")
    return space, settings, name


def _warn(message: str) -> None:
    print(f"run_sweep.py: warning: {message}", file=sys.stderr)


def configure_console(sweep_dir, *, verbose: bool) -> None:
    """pf-sweep's own lines on the console; Ray's driver-side logs in ``<sweep>/logs/ray-driver.log``.

    The workers' output and Ray's internal warnings stay off the console unless ``--verbose`` (Ray
    keeps them in its session logs). Ray's errors, such as a failed trial's, still show.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:
        return
    # Tune's newer console output prints its experiment box and paths even when verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from pf_sweep.console import filter_ray_notices

    filter_ray_notices()
    if not sweep_dir.is_local:
        return
    from pathlib import Path

    logs = Path(str(sweep_dir)) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(logs / "ray-driver.log")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        ray_logger = logging.getLogger(name)
        for handler in list(ray_logger.handlers):
            handler.setLevel(logging.ERROR)
        ray_logger.addHandler(to_file)
    # Tune's TensorBoard logger renames metrics such as eval/<dataset>:<split>/top1 (a ':' is not a
    # legal TensorBoard tag) with one warning per trial: the file keeps them, the console does not.
    tensorboard = logging.getLogger("tensorboardX")
    tensorboard.propagate = False
    tensorboard.addHandler(to_file)


def storage_problem(sweep_dir) -> str | None:
    """Why a file cannot be written into the sweep directory now, or None when one can."""
    probe = sweep_dir / f".pf-write-probe-{os.getpid()}"
    try:
        probe.write_text("")
        if probe.is_local:
            os.remove(str(probe))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_spaces:
        import search_spaces

        for name in search_spaces.names():
            print(f"{name:24s} {search_spaces.get(name).description}")
        return 0
    space, settings, name = resolve(args, parser)
    from pf_sweep import preflight
    from pf_sweep.storage import StoragePath
    from pf_sweep.sweep import SWEEP_FILE, optuna_storage_url, planned_trials, trial_base

    sweep_dir = StoragePath.of(args.storage) / name
    exists = (sweep_dir / SWEEP_FILE).exists()
    try:
        if args.resume:
            meta = preflight.read_resumable(sweep_dir, mend=not args.dry_run)
            metric, mode = meta.get("metric", space.metric), meta.get("mode", space.mode)
            preflight.check_storage(str(sweep_dir), field="--storage/--name")
            if args.address is None:  # the resumed trials ask for what they asked for at launch
                stored = meta["settings"]
                preflight.check_local_resources(
                    int(stored.get("workers_per_trial", 1)),
                    float(stored.get("cpus_per_worker", 1.0)),
                    float(stored.get("gpus_per_worker", 0.0)),
                )
        elif exists and not args.dry_run:
            raise ValueError(f"A sweep named {name!r} already exists in {sweep_dir.parent}: add --resume, or pick another --name")
        else:
            metric, mode = space.metric, space.mode
    except ValueError as err:
        parser.exit(2, f"run_sweep.py: error: {err}\n")
    # Now, before Ray is imported: Ray reads its auth mode, and where a local Ray listens, then.
    if args.address:
        preflight.present_auth_token()
    elif not args.dry_run:
        from pf_sweep.trial import import_ray_for_local_use

        import_ray_for_local_use()
    if args.dry_run:
        print(f"space: {space.description}")
        print(f"metric: {space.metric} ({space.mode})")
        print(f"settings: {json.dumps(settings.__dict__)}")
        print(f"base config: {json.dumps(trial_base(space, settings), sort_keys=True)}")
        total = planned_trials(space, settings)
        kind = "Optuna TPE" if space.suggest is not None else "named runs" if space.points is not None else "grid"
        print(f"trials: {total} ({kind}), first ones:")
        for i, params in enumerate(space.sample(min(3, total), seed=args.seed)):
            print(f"trial {i}: {json.dumps(params, sort_keys=True)}")
        print(f"results would go to: {sweep_dir}")
        return 0

    configure_console(sweep_dir, verbose=args.verbose)
    from pf_sweep import sweep
    from pf_sweep.scheduling import UnschedulableError
    from pf_sweep.shutdown import StopGuard, stop_ray

    study_url = meta.get("optuna_storage") if args.resume else optuna_storage_url(settings, sweep_dir)
    if study_url and space.suggest is not None:
        shown = sweep.redact_url(study_url)
        print(f"Optuna study {name!r} in {shown} (watch it live: optuna-dashboard {shown})")
    resume_hint = f"python run_sweep.py --storage {args.storage} --name {name} --resume"
    planned = meta.get("trials", 0) if args.resume else sweep.planned_trials(space, settings)
    # `ray job stop` and Kubernetes send SIGTERM: stop the way Ctrl-C does (Tune saves its state on
    # SIGINT), and exit within PF_SWEEP_STOP_GRACE_S seconds whatever hangs (pf_sweep.shutdown).
    guard = StopGuard(resume_hint)
    try:
        stored = meta.get("settings", {}) if args.resume else settings.__dict__
        sweep.ensure_sweep_ray(args.address, verbose=args.verbose, worker_groups=sweep.uses_worker_groups(stored))
        guard.install()  # after ray.init, whose own SIGTERM handler aborts the driver
        if args.resume:
            results = sweep.resume(str(sweep_dir), address=args.address, verbose=args.verbose)
        else:
            results = sweep.launch(space, settings, storage_path=args.storage, name=name, address=args.address)
    except KeyboardInterrupt:
        guard.print_resume_hint()
        return 130
    except UnschedulableError as err:
        print(f"run_sweep.py: error: {err}\nContinue once the cluster has them: {resume_hint}", file=sys.stderr)
        return 1
    except ValueError as err:  # e.g. a sweep directory without Tune's state, a trial that can never fit
        parser.exit(2, f"run_sweep.py: error: {err}\n")
    except Exception as err:  # Tune and Optuna fail in their own words when the storage goes away: say so
        problem = storage_problem(sweep_dir)
        if problem is None:
            raise
        reason = f"{problem}; the sweep stopped on {type(err).__name__}"
        print(f"run_sweep.py: error: cannot write the sweep directory {sweep_dir} ({reason})", file=sys.stderr)
        print(f"Nothing finished is lost. Once the storage is back: {resume_hint}", file=sys.stderr)
        return 1
    # Tune returns normally after a SIGINT, with the trials it stopped marked TERMINATED.
    ended = sweep.ended_trials(results)
    if ended < planned and (guard.stop_requested or results.num_terminated + results.num_errors < planned):
        guard.print_resume_hint(f"Interrupted after {ended} of {planned} trials.")
        return 130
    try:
        best, frame = sweep.summarize(results, metric, mode)
    except RuntimeError:  # Tune found no trial that reported the metric
        for error in results.errors:
            print(f"trial error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        print(f"No trial reported {metric}; see the errors above and {sweep_dir}", file=sys.stderr)
        return 1
    summary = sweep_dir / "summary.csv"
    summary.write_text(frame.to_csv(index=False))
    print(f"\nBest trial ({metric} = {best['metrics'].get(metric):.6g}):")
    print(json.dumps(best["config"], indent=1, sort_keys=True))
    print(f"checkpoint: {best['checkpoint']}")
    print(f"results: {sweep_dir}  summary: {summary}")
    if not args.verbose:  # --verbose forwards the workers' logs: Ray's exit hook waits for their last lines
        stop_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
