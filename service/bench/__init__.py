"""Benchmarks behind `emoloop bench ...`: they print medians, targets and ratios side by side."""
