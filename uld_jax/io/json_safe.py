"""JSON-ready copies of report structures (numpy scalars and arrays, NaN/inf)."""

from __future__ import annotations

from typing import Any

import numpy as np


def json_safe(o: Any) -> Any:
    """A copy of ``o`` that ``json.dumps`` writes as standard JSON: dict keys -> ``str``, tuples
    and arrays -> lists, numpy scalars -> Python numbers, non-finite floats -> ``None`` (null)."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.generic):
        return json_safe(o.item())
    return o
