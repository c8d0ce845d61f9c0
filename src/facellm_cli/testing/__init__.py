"""Throwaway local models for tests and pipeline dry-runs (no hub, a few MB)."""

from .tiny import FAMILIES, build_tiny_model

__all__ = ["FAMILIES", "build_tiny_model"]
