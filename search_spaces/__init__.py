"""Named search spaces: ``get(name_or_path)``, ``names()``.

Each module in this package defines one ``SPACE``: a self-contained experiment family you can read
top to bottom (fixed TrialConfig fields, an Optuna define-by-run ``suggest``, the paper's defaults
as points to evaluate, the metric and the default budget). A user's own space is a Python file
defining ``SPACE``, named by its path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from search_spaces.base import SearchSpace

__all__ = ["SearchSpace", "get", "names"]


def names() -> list[str]:
    """The shipped spaces (module names of this package that define ``SPACE``)."""
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name != "base" and not m.name.startswith("_"))


def get(name: str) -> SearchSpace:
    """The space called ``name``, or the ``SPACE`` defined in the Python file at path ``name``."""
    if name.endswith(".py") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"Invalid space: {name!r} is not a file")
        module = _load_file(path)
    elif name in names():
        module = importlib.import_module(f"search_spaces.{name}")
    else:
        raise ValueError(f"Unknown space: {name!r} (shipped: {', '.join(names())}; or a path to a .py file defining SPACE)")
    space = getattr(module, "SPACE", None)
    if not isinstance(space, SearchSpace):
        raise ValueError(f"Invalid space {name!r}: the module defines no SPACE = SearchSpace(...)")
    return space


def _load_file(path: Path) -> ModuleType:
    """Import a user's space file as a module registered in ``sys.modules``.

    Tune pickles the searcher (an Optuna space's ``suggest`` included) by reference when it saves
    the sweep's state, so the function's module must be importable by name, in this process and in
    the one that resumes the sweep (which calls ``get`` with the same path before restoring).
    """
    name = f"user_space_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
