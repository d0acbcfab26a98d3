"""Shared test settings: single-threaded, deterministic torch (results do not depend on the machine)."""

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
