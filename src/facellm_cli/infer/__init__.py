"""Batched generation shared by ``ask``, ``evaluate`` and ``serve``."""
