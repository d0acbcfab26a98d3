"""Named search spaces."""
