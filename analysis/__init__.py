"""Analysis of sweep results."""
