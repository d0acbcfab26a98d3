"""Mend Tune state files that a killed driver left half-copied in a sweep directory.

Ray Tune (2.60) saves its experiment state (``experiment_state-<session>.json``, the searcher's and
callbacks' pickles) into a staging directory inside the driver's Ray session
(``<ray temp>/session_*/artifacts/<time>/<sweep name>/driver_artifacts/``), then copies those files
to the sweep directory from a background thread. That copy is not atomic: a driver SIGKILLed while
it runs leaves a file cut short, and ``--resume`` then fails deep inside Tune (a ``JSONDecodeError``,
or a searcher missing keys). The staging directory outlives the killed driver on its machine, and
holds the complete files under the same names; ``mend_torn_state`` puts those back before Tune reads
anything, or refuses with a message saying which file is torn.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import pickletools
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXPERIMENT_STATE_PATTERN = "experiment_state-*.json"
TUNER_STATE = "tuner.pkl"  # the Tuner's own settings, written once when a sweep starts
PICKLE_PROTOCOL_2_PLUS = 0x80  # the PROTO opcode that opens every pickle of protocol >= 2


def is_complete(data: bytes) -> bool:
    """Whether ``data`` is a whole JSON document or a whole pickle stream (checked without unpickling).

    Tune names some pickles ``.json`` (``search_gen_state-*.json``), so the content decides.
    """
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
    """Where a local Ray keeps its session directories: ``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp`` (plus ``ray``)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def newest_session(names: list[str]) -> str | None:
    """The session suffix of the experiment state Tune restores from: the greatest name, as Tune picks it."""
    states = fnmatch.filter(names, EXPERIMENT_STATE_PATTERN)
    if not states:
        return None
    return max(states).removeprefix("experiment_state-").removesuffix(".json")


def staging_dirs(sweep_name: str, session: str, temp_root: Path) -> list[Path]:
    """Staging directories that hold this session's experiment state, newest first."""
    name, stamp = glob.escape(sweep_name), glob.escape(session)
    found = temp_root.glob(f"session_*/artifacts/*/{name}/driver_artifacts/experiment_state-{stamp}.json")
    return sorted((path.parent for path in found), key=lambda d: d.stat().st_mtime, reverse=True)


def mend_torn_state(sweep_dir: Any, *, temp_root: Path | None = None) -> list[str]:
    """Replace the newest session's torn Tune files in ``sweep_dir`` (a ``StoragePath``) by their staged copies.

    All of that session's files that the staging directory holds are put back together, not only the
    torn one, so the experiment state and the searcher's state come from the same save. Returns the
    names replaced (empty when nothing was torn). Raises ValueError when a file is torn and no complete
    staged copy of the whole set exists on this machine, or when ``tuner.pkl`` is torn.
    """
    fs, root = sweep_dir.filesystem()
    names = _file_names(fs, root)
    if TUNER_STATE in names and not is_complete(_read(fs, f"{root}/{TUNER_STATE}")):
        raise ValueError(
            f"{TUNER_STATE} in {sweep_dir} is incomplete: the driver was killed while Tune wrote it, as the sweep "
            "started (Tune writes it once and stages no copy). Nothing can be resumed from it: launch the sweep "
            "again under another --name, or remove the directory first"
        )
    session = newest_session(names)
    if session is None:
        return []
    ours = [name for name in names if _of_session(name, session)]
    torn = [name for name in ours if not is_complete(_read(fs, f"{root}/{name}"))]
    if not torn:
        return []
    temp_root = ray_temp_root() if temp_root is None else temp_root
    for staged in staging_dirs(sweep_dir.name, session, temp_root):
        copies = {path.name: path.read_bytes() for path in staged.iterdir() if path.is_file() and _of_session(path.name, session)}
        if set(torn) <= set(copies) and all(is_complete(data) for data in copies.values()):
            for name, data in sorted(copies.items()):
                _write_atomically(fs, root, name, data)
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
    raise ValueError(
        f"{', '.join(torn)} in {sweep_dir} {'is' if len(torn) == 1 else 'are'} incomplete: the sweep's driver was killed "
        f"while Tune copied {'it' if len(torn) == 1 else 'them'}, and no complete staged copy was found under "
        f"{temp_root}/session_*/artifacts/*/{sweep_dir.name}/driver_artifacts (the staging copies live on the "
        "machine that ran the driver; resume there). Moving every file ending in "
        f"-{session}.json or -{session}.pkl out of the sweep directory resumes from the previous session's state, "
        "if it has one (trials since then run again)."
    )


def _of_session(name: str, session: str) -> bool:
    return name.endswith((f"-{session}.json", f"-{session}.pkl"))


def _file_names(fs: Any, root: str) -> list[str]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return [info.base_name for info in infos if info.type == pyarrow.fs.FileType.File]


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write_atomically(fs: Any, root: str, name: str, data: bytes) -> None:
    """Write beside, then move over: a second kill leaves the old file or the new one, never half of one."""
    tmp = f"{root}/.{name}.mending"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, f"{root}/{name}")
