"""Mend Tune state files that a killed driver left half-copied in a sweep directory.

Ray Tune (2.60) saves its state (``experiment_state-<stamp>.json``, the search algorithm's and the
callbacks' files, one set per driver session) into a staging directory inside the driver's Ray
session (``<ray temp>/session_*/artifacts/<time>/<sweep name>/driver_artifacts/``), then copies the
whole directory to the sweep directory from a background thread, file by file and not atomically.
A driver SIGKILLed during a copy leaves a file cut short, and ``--resume`` then fails deep inside
Tune (a ``JSONDecodeError``, or a searcher missing keys). The staging directory outlives the killed
driver on its machine and holds the complete files under the same names; ``mend_torn_state`` puts
those back before Tune reads anything, or refuses with a message saying which file is torn.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import pickletools
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Tune's state files, one of each per driver session (``{}`` is the session's stamp). On restore,
# Tune reads the greatest name of each kind, each kind on its own.
TUNE_STATE_FILES = (
    "experiment_state-{}.json",  # TuneController.CKPT_FILE_TMPL
    "searcher-state-{}.pkl",  # Searcher.CKPT_FILE_TMPL
    "search_gen_state-{}.json",  # SearchGenerator.CKPT_FILE_TMPL (a pickle, despite its name)
    "basic-variant-state-{}.json",  # BasicVariantGenerator.CKPT_FILE_TMPL (a pickle too)
    "callback-states-{}.pkl",  # CallbackList.CKPT_FILE_TMPL
)
TUNER_STATE = "tuner.pkl"  # the Tuner's own settings, written once when a sweep starts
PICKLE_PROTOCOL_2_PLUS = 0x80  # the PROTO opcode that opens every pickle of protocol >= 2


def is_complete(data: bytes) -> bool:
    """Whether ``data`` is a whole JSON document or a whole pickle stream (checked without unpickling)."""
    if not data:
        return False
    if data[0] == PICKLE_PROTOCOL_2_PLUS:
        try:
            for _ in pickletools.genops(data):  # raises on a stream that ends before its STOP opcode
                pass
        except ValueError:
            return False
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def ray_temp_root() -> Path:
    """Where a local Ray keeps its session directories, as Ray picks it: ``$RAY_TMPDIR``, on Linux
    ``$TMPDIR``, else ``/tmp``; plus ``ray``."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return Path(base) / "ray"


def newest_state_files(names: list[str]) -> dict[str, str]:
    """{template: the file of that kind Tune restores from}: the greatest matching name, as Tune picks it."""
    newest = {}
    for template in TUNE_STATE_FILES:
        matching = fnmatch.filter(names, template.format("*"))  # never Tune's hidden ``.<uuid>-tmp-...`` files
        if matching:
            newest[template] = max(matching)
    return newest


def stamp_of(name: str, template: str) -> str:
    prefix, suffix = template.split("{}")
    return name.removeprefix(prefix).removesuffix(suffix)


def staging_dirs(sweep_name: str, file_name: str, temp_root: Path) -> list[Path]:
    """This user's staging directories of this sweep that hold ``file_name``, newest first.

    Ray's temp and session directories are writable by every user, so a staged file is taken only
    from directories and files that are this user's own and not symbolic links: nobody else's pickle
    is copied into the sweep, where Tune would unpickle it.
    """
    pattern = f"session_*/artifacts/*/{glob.escape(sweep_name)}/driver_artifacts/{glob.escape(file_name)}"
    found = [path.parent for path in temp_root.glob(pattern) if _own_regular_file(path)]
    found = [d for d in found if all(_own_dir(p) for p in (d, d.parent, d.parent.parent))]
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def mend_torn_state(sweep_dir: Any, *, temp_root: Path | None = None) -> list[str]:
    """Replace torn Tune state files in ``sweep_dir`` (a ``StoragePath``) by the copies Tune staged.

    Every file Tune would restore from is checked. When one is torn, all the files of its session
    that the staging directory holds are put back together, not only the torn one, so the experiment
    state and the searcher's state come from the same save. Returns the names replaced (empty when
    nothing was torn). Raises ValueError when a file is torn and no complete staged set exists on
    this machine, or when ``tuner.pkl`` is torn.
    """
    fs, root = sweep_dir.filesystem()
    names = _file_names(fs, root)
    if TUNER_STATE in names and not is_complete(_read(fs, f"{root}/{TUNER_STATE}")):
        raise ValueError(
            f"{TUNER_STATE} in {sweep_dir} is incomplete: the driver was killed while Tune wrote it, as the sweep "
            "started (Tune writes it once and stages no copy). Nothing can be resumed from it: launch the sweep "
            "again under another --name, or remove the directory first"
        )
    torn = {}  # stamp -> torn names of that session
    for template, name in newest_state_files(names).items():
        if not is_complete(_read(fs, f"{root}/{name}")):
            torn.setdefault(stamp_of(name, template), []).append(name)
    temp_root = ray_temp_root() if temp_root is None else temp_root
    mended = []
    for stamp, torn_names in sorted(torn.items()):
        mended += _put_back_session(fs, root, sweep_dir, stamp, torn_names, temp_root)
    return mended


def _put_back_session(fs: Any, root: str, sweep_dir: Any, stamp: str, torn: list[str], temp_root: Path) -> list[str]:
    candidates = {d: None for name in torn for d in staging_dirs(sweep_dir.name, name, temp_root)}
    for staged in sorted(candidates, key=lambda d: d.stat().st_mtime, reverse=True):
        paths = [staged / template.format(stamp) for template in TUNE_STATE_FILES]
        copies = {path.name: path.read_bytes() for path in paths if _own_regular_file(path)}
        if set(torn) <= set(copies) and all(is_complete(data) for data in copies.values()):
            try:
                for name, data in sorted(copies.items()):
                    _write_beside_then_move(fs, root, name, data)
            except OSError as err:
                raise ValueError(f"Cannot put Tune's staged state back into {sweep_dir}: {err}") from None
            logger.warning(
                "%s in %s %s cut short (its driver was killed while Tune copied it); put back the complete "
                "copies Tune had staged in %s: %s",
                ", ".join(torn),
                sweep_dir,
                "was" if len(torn) == 1 else "were",
                staged,
                ", ".join(sorted(copies)),
            )
            return sorted(copies)
    one = len(torn) == 1
    raise ValueError(
        f"{', '.join(torn)} in {sweep_dir} {'is' if one else 'are'} incomplete: the sweep's driver was killed "
        f"while Tune copied {'it' if one else 'them'}, and no complete staged copy was found under "
        f"{temp_root}/session_*/artifacts/*/{sweep_dir.name}/driver_artifacts (the staging copies live on the "
        "machine that ran the driver; resume there). Moving every file ending in "
        f"-{stamp}.json or -{stamp}.pkl out of the sweep directory resumes from the previous session's state, "
        "if it has one (trials since then run again)."
    )


def _owned(path: Path, is_kind: Callable[[int], bool]) -> bool:
    """``path`` is this user's, of that kind (``stat.S_ISREG``, ``stat.S_ISDIR``), and not a link."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return is_kind(info.st_mode) and info.st_uid == os.getuid()


def _own_regular_file(path: Path) -> bool:
    return _owned(path, stat.S_ISREG)


def _own_dir(path: Path) -> bool:
    return _owned(path, stat.S_ISDIR)


def _file_names(fs: Any, root: str) -> list[str]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return [info.base_name for info in infos if info.type == pyarrow.fs.FileType.File]


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write_beside_then_move(fs: Any, root: str, name: str, data: bytes) -> None:
    """Locally a rename: a second kill leaves the old file or the new one, never half of one. (On
    object stores a move is a copy, but their uploads are whole or absent anyway.)"""
    tmp = f"{root}/.{name}.mending"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, f"{root}/{name}")
