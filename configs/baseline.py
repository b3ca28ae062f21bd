"""MULAN-like baseline: DeepLesion only, one (whole-body) classification head, no organ gate.

    python -m uld_jax.main --config configs/baseline.py:tiny --workdir runs/baseline_tiny
"""

from configs import common
from uld_jax import core


def get_config(arg: str | None = None):
    c = common.base_config(common.parse_variant(arg))
    c.model.num_datasets = 1                 # DeepLesion's expert only
    c.model.num_organ_heads = 1              # the whole-body head
    c.model.use_gate = False
    c.data.datasets = (core.DATASETS[0],)    # dataset id 0 = the single expert's column
    return c
