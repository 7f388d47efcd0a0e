"""Grouped matrix multiplication: reference, XLA paths and the dispatching op."""
