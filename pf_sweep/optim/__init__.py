"""The SAM family (``SAM``, ``RandSAM``), rho schedules, and the optimizer factory."""

from pf_sweep.optim.rho import ConstantRho, LrProportionalRho, rho_schedule_from_dict
from pf_sweep.optim.sam import SAM, RandSAM

__all__ = ["SAM", "ConstantRho", "LrProportionalRho", "RandSAM", "rho_schedule_from_dict"]
