"""MULAN-like baseline: DeepLesion only, one (whole-body) classification head, no organ gate.

    python -m uld_jax.main --config configs/baseline.py:tiny --workdir runs/baseline_tiny
"""

from configs import common
from uld_jax import core


def get_config(arg: str | None = None):
    c = common.base_config(common.parse_variant(arg))
    c.model.datasets = ("deeplesion",)
    c.model.organ_heads = (core.ORGAN_HEADS[0],)
    c.model.use_gate = False
    c.data.datasets = ("deeplesion",)
    return c
