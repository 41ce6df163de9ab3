"""Helpers for tests: multi-process CPU runs and tiny models."""
