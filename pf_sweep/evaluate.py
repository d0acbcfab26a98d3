"""Stand-alone evaluation of checkpoints: the paper release's validation suites.

``python -m pf_sweep.evaluate CHECKPOINT|SWEEP --suite imagenet`` scores a checkpoint (or the final
checkpoint of every trial of a sweep, as Ray tasks with a GPU each when the cluster has GPUs) on:

- ``imagenet``: ImageNet validation (``eval/imagenet/top1``, ``top5``), ReaL (``eval/real/*``: a hit
  is a prediction in the image's label set; images with an empty set are dropped), ImageNet-V2
  (``eval/v2/*``), ImageNet-R and ImageNet-Sketch. ImageNet-R's labels are ImageNet-1k indices: the
  release scores the argmax over all 1000 logits (``eval/r/*``, reported as it does); Hendrycks et
  al.'s protocol restricts the logits to ImageNet-R's 200 classes (``eval/r200/*``). The 200 classes
  are the ones its labels use (every one of them has images), so no list is needed.
- ``cifar10`` / ``cifar100``: the test split after fine-tuning.
- ``custom``: the sets named ``DATASET:SPLIT`` with ``--sets`` (``digits:test``), which any suite also takes.

Image size: the release's stand-alone evaluation runs at the model's timm test size when its default
pretrained config has one (ResNet-50 and -101: 288 px, Resize 329 -> crop 288 at crop 0.875) and at
the training size otherwise (ViTs: 224); training-time validation runs at 224. ``--size release``
(the default) does the former, ``--size train`` the latter, ``--size N`` any size.

Each checkpoint's results go to ``evaluation-<suite>.json`` beside its ``state.pt``, where
``analysis.load_sweep`` picks them up as columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split and the metric prefix it reports under (``eval/<name>/top1``)."""

    dataset: str
    split: str
    name: str
    class_subset_name: str | None = None  # also score over the classes the labels use, under this name


SUITES: dict[str, tuple[EvalSet, ...]] = {
    "imagenet": (
        EvalSet("tfds/imagenet2012", "validation", "imagenet"),
        EvalSet("tfds/imagenet2012_real", "validation", "real"),
        EvalSet("tfds/imagenet_v2", "test", "v2"),
        EvalSet("tfds/imagenet_r", "test", "r", class_subset_name="r200"),
        EvalSet("tfds/imagenet_sketch", "test", "sketch"),
    ),
    "cifar10": (EvalSet("tfds/cifar10", "test", "cifar10"),),
    "cifar100": (EvalSet("tfds/cifar100", "test", "cifar100"),),
    "custom": (),  # only the DATASET:SPLIT sets given with --sets
}
RESULT_PREFIX = "evaluation-"


def result_file(checkpoint: str | Path, suite: str) -> Path:
    return Path(checkpoint) / f"{RESULT_PREFIX}{suite}.json"


def topk_hits(logits, labels, class_subset=None):
    """(top-1 hits, top-5 hits, count) of single-label ``labels``; ``class_subset``: a 1-D tensor of
    class ids the prediction is restricted to (the others' logits are ignored)."""
    import torch

    if class_subset is not None:
        masked = torch.full_like(logits, float("-inf"))
        masked[:, class_subset] = logits[:, class_subset]
        logits = masked
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=-1).sum()), len(labels)


def score(logits, labels, class_subset=None) -> dict[str, float]:
    """top1 / top5 (percent) and the count scored; label sets (rows padded with -1) score as ReaL."""
    if labels.dim() == 2:
        from pf_sweep.train import _label_set_sums

        _, top1, top5, n = _label_set_sums(logits.float(), labels).tolist()
    else:
        top1, top5, n = topk_hits(logits.float(), labels, class_subset)
    n = max(n, 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "count": float(n)}


def _check_size(size: str | int) -> None:
    if not (str(size).isdigit() or size in ("release", "train")):
        raise ValueError(f"Invalid --size {size!r} (allowed: release, train, or a number of pixels)")


def eval_resolution(cfg, model, size: str | int, native: int = 224) -> int:
    """The evaluation image side: the release's (timm's test size, else training), training, or given.
    ``native``: the dataset's own size, what training used when ``cfg.img_size`` is None."""
    _check_size(size)
    if str(size).isdigit():
        return int(size)
    train = cfg.img_size or native
    if size == "train":
        return train
    test = (getattr(model, "pretrained_cfg", None) or {}).get("test_input_size")
    return int(test[-1]) if test else train


def evaluate_checkpoint(
    checkpoint: str | Path,
    suite: str = "imagenet",
    *,
    sets: list[str] | None = None,
    size: str | int = "release",
    data_dir: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    write: bool = True,
) -> dict[str, float]:
    """Every set of ``suite`` (or the named ``sets`` of it) scored on the model in ``checkpoint``."""
    import torch

    from pf_sweep.checkpoint import load_checkpoint
    from pf_sweep.config import TrialConfig
    from pf_sweep.data import get_source
    from pf_sweep.models import build_model

    _chosen_sets(suite, sets)
    state = load_checkpoint(checkpoint)
    cfg = TrialConfig.from_dict({**state["config"], "pretrained_path": None, **({"data_dir": data_dir} if data_dir else {})})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = get_source(cfg.dataset).info(cfg.data_dir, img_size=cfg.img_size, num_classes=cfg.num_classes)
    model = build_model(cfg, info)
    model.load_state_dict(state["model"])
    out = evaluate_model(model.to(device), cfg, suite, sets=sets, size=size, batch_size=batch_size, native=info.image_size)
    if write:
        result_file(checkpoint, suite).write_text(json.dumps({"suite": suite, "size": str(size), **out}, indent=1))
    return out


def evaluate_model(
    model,
    cfg,
    suite: str,
    *,
    sets: list[str] | None = None,
    size: str | int = "release",
    batch_size: int = 64,
    native: int = 224,
) -> dict[str, float]:
    """``eval/<set>/<top1|top5|count>`` of ``model`` (on its device, left in eval mode) for each set of
    ``suite``, through ``cfg``'s evaluation transform at the resolved size (``native``: the training
    dataset's own image size). A trial with ``eval_suite`` calls this at its end."""
    from pf_sweep.data import ShardedSampler, TransformedSplit, build_loader, build_transform, get_source

    device = next(model.parameters()).device
    model.eval()
    side = eval_resolution(cfg, model, size, native)
    out: dict[str, float] = {"eval/img_size": float(side)}
    for eval_set in _chosen_sets(suite, sets):
        source = get_source(eval_set.dataset)
        set_info = source.info(cfg.data_dir, img_size=side)
        transform = build_transform(dataclasses.replace(cfg, img_size=side), set_info, training=False)
        # Label sets (ReaL) come padded to a fixed width; the class count is wide enough for any set.
        width = {"label_width": set_info.num_classes} if eval_set.dataset.startswith("tfds/") else {}
        data = TransformedSplit(source.split(eval_set.split, cfg.data_dir, **width), transform)
        loader = build_loader(data, ShardedSampler(len(data)), batch_size, workers=cfg.loader_workers)
        logits, labels = _predict(model, loader, device)
        for key, value in score(logits, labels).items():
            out[f"eval/{eval_set.name}/{key}"] = value
        if eval_set.class_subset_name:
            used = labels.unique()
            for key, value in score(logits, labels, used).items():
                out[f"eval/{eval_set.class_subset_name}/{key}"] = value
            out[f"eval/{eval_set.class_subset_name}/classes"] = float(len(used))
        logger.info("%s top-1 %.2f", eval_set.name, out[f"eval/{eval_set.name}/top1"])
    return out


def _chosen_sets(suite: str, sets: list[str] | None) -> tuple[EvalSet, ...]:
    """The suite's sets, or the named ones; ``DATASET:SPLIT`` names any other set (``tfds/svhn_cropped:test``)."""
    from pf_sweep.data.registry import is_known_dataset

    if suite not in SUITES:
        raise ValueError(f"Invalid --suite {suite!r} (allowed: {', '.join(SUITES)})")
    if not sets:
        if not SUITES[suite]:
            raise ValueError(f"Suite {suite} has no sets of its own: name them with --sets DATASET:SPLIT")
        return SUITES[suite]
    known = {s.name: s for s in SUITES[suite]}
    unknown = [s for s in sets if s not in known and ":" not in s]
    if unknown:
        raise ValueError(
            f"Invalid --sets {','.join(unknown)!r} for suite {suite} (its sets: {', '.join(known) or 'none'}; or DATASET:SPLIT)"
        )
    chosen = []
    for name in sets:
        if name in known:
            chosen.append(known[name])
        else:
            cut = name.split("[", 1)[0].rfind(":")  # the colon before the split: a TFDS version has one too
            dataset, split = name[:cut], name[cut + 1 :]
            if not is_known_dataset(dataset) or not split:
                raise ValueError(f"Invalid --sets {name!r}: expected DATASET:SPLIT with a known dataset (digits, tfds/<name>)")
            chosen.append(EvalSet(dataset, split, f"{dataset.removeprefix('tfds/')}:{split}"))
    return tuple(chosen)


def _predict(model, loader, device):
    """All logits (float16 on the CPU: ImageNet-R's 30,000 x 1000 take 60 MB) and labels of a split."""
    import torch

    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu().half())
            labels.append(y)
    return torch.cat(logits).float(), torch.cat(labels)


def final_checkpoints(sweep: str | Path) -> dict[str, str]:
    """{trial id: its newest complete checkpoint} of a sweep directory."""
    from pf_sweep.run_dir import RunDirectory

    out = {}
    for run in sorted(Path(sweep, "runs").glob("train-*")):
        names = RunDirectory(run).checkpoints()
        if names:
            out[run.name.removeprefix("train-")] = str(run / names[-1])
    return out


def evaluate_sweep(sweep: str | Path, suite: str, *, address: str | None = None, progress: bool = True, **options: Any):
    """Every trial's final checkpoint of ``sweep`` evaluated as a Ray task (a GPU each when the
    cluster has one); returns {trial id: metrics}, an ``{"error": ...}`` entry for a failed one."""
    from tqdm import tqdm

    from pf_sweep.trial import ensure_ray

    _chosen_sets(suite, options.get("sets"))
    checkpoints = final_checkpoints(sweep)
    if not checkpoints:
        raise ValueError(f"Nothing to evaluate: {sweep} has no trial with a complete checkpoint")
    ensure_ray(address, verbose=False, dashboard=False)  # first: it imports Ray so that a local one is on loopback
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(evaluate_checkpoint)
    pending = {task.remote(path, suite, **options): trial for trial, path in checkpoints.items()}
    results: dict[str, dict] = {}
    with tqdm(total=len(pending), desc=f"evaluating {suite}", disable=not progress) as bar:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(done)
            try:
                results[trial] = ray.get(done)
            except Exception as err:  # a task's error: reported, the others go on
                results[trial] = {"error": str(err).strip().splitlines()[-1]}
            bar.update()
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pf_sweep.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a checkpoint directory (holding state.pt) or a sweep directory (holding sweep.json)")
    p.add_argument("--suite", default="imagenet", help=f"one of {', '.join(SUITES)}")
    p.add_argument(
        "--sets", help="only these sets of the suite, comma-separated (imagenet: imagenet,real,v2,r,sketch), or DATASET:SPLIT"
    )
    p.add_argument("--size", default="release", help="release (timm's test size: 288 for ResNets), train, or pixels")
    p.add_argument("--data-dir", help="TFDS data dir (default: the checkpoint's data_dir)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--address", help="Ray cluster for a sweep's evaluation (default: a local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    target = Path(args.target)
    sets = [s.strip() for s in args.sets.split(",")] if args.sets else None
    options = {"sets": sets, "size": args.size, "data_dir": args.data_dir, "batch_size": args.batch_size}
    try:
        _chosen_sets(args.suite, sets)
        _check_size(args.size)
        if (target / "state.pt").is_file():
            results = {str(target): evaluate_checkpoint(target, args.suite, **options)}
        elif (target / "sweep.json").is_file():
            results = evaluate_sweep(target, args.suite, address=args.address, **options)
        else:
            raise ValueError(f"{target} is neither a checkpoint (no state.pt) nor a sweep (no sweep.json)")
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"python -m pf_sweep.evaluate: error: {err}\n")
    print(json.dumps(results, indent=1, sort_keys=True))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
