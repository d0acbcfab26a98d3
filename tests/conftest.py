"""Shared test settings: single-threaded, deterministic torch (results do not depend on the machine)."""

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def fake_ray_path(root):
    """A PYTHONPATH entry (under ``root``, a Path) whose ``ray`` fails on import: proof no Ray started."""
    fake = root / "fake-ray" / "ray"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('ray must not be imported on bad input')\n")
    return str(fake.parent)
