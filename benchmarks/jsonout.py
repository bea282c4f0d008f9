"""Strict JSON for the benchmarks' --json output (benchmarks/report.py reads it back).

A value JSON cannot hold becomes null (an infinite PSNR of identical images, a NaN bound of
too few samples), and numpy scalars become Python numbers; ``json.dumps(..., allow_nan=False)``
then accepts the document.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
