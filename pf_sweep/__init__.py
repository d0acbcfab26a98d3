"""pf-sweep: sharpness-aware training sweeps."""
