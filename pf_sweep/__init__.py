"""pf-sweep: distributed sweeps for sharpness-aware training research (SAM, GSAM, ASAM, OBF)."""

from pf_sweep.config import TrialConfig
from pf_sweep.divergence import TrainingDiverged

__version__ = "0.1.0"
__all__ = ["TrainingDiverged", "TrialConfig", "TrialResult", "__version__", "run_trial"]


def __getattr__(name: str):
    # Lazy: ``import pf_sweep`` stays light (no Ray, no timm) for the CLI's fast argument checks.
    if name in ("run_trial", "TrialResult"):
        from pf_sweep import trial

        return getattr(trial, name)
    raise AttributeError(name)
