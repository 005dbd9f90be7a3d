"""Measurement: recall per level and cascade, the p-small-world stream simulator and its report."""
