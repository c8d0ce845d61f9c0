"""Leakage-free, stratified, seeded train/val/test assignment.

The unit of assignment is an image, or a group of images sharing a
``group_key`` label (one identity): a unit goes to exactly one split, so no
image (or person) is seen in training and again in evaluation.

Within each stratum, units are ordered by a keyed hash of (seed, unit) —
stable across Python versions and runs, unlike ``hash()`` or ``random`` with
insertion-order dependence — and cut by the ratios. Rounding leftovers go to
the split furthest below its target over all strata seen so far, so small
strata do not all round the same way and overall sizes track the ratios.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

SPLITS = ("train", "val", "test")


def stable_hash(*parts: object) -> int:
    """64-bit hash of the parts, identical on every machine and run."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


def assign_splits(units: Mapping[str, str], ratios: list[float], seed: int) -> dict[str, str]:
    """Map each unit key to 'train' | 'val' | 'test'.

    ``units`` maps unit key -> stratum ('' when not stratified). The result
    depends only on the set of (unit, stratum) pairs, the ratios and the seed.
    """
    by_stratum: dict[str, list[str]] = {}
    for unit, stratum in units.items():
        by_stratum.setdefault(stratum, []).append(unit)
    assigned_total = [0] * len(SPLITS)
    seen_total = 0
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum], key=lambda u: (stable_hash(seed, u), u))
        n = len(members)
        counts = [math.floor(r * n + 1e-9) for r in ratios]
        seen_total += n
        for _ in range(n - sum(counts)):
            deficits = [ratios[s] * seen_total - (assigned_total[s] + counts[s]) for s in range(len(SPLITS))]
            best = max(range(len(SPLITS)), key=lambda s: (deficits[s], -s))
            counts[best] += 1
        start = 0
        for s, name in enumerate(SPLITS):
            for unit in members[start : start + counts[s]]:
                out[unit] = name
            start += counts[s]
            assigned_total[s] += counts[s]
    return out
