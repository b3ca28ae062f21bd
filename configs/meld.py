"""MELD: four datasets (DeepLesion, LUNA16, LiTS, NIH-LN), four organ heads and the organ gate.

    python -m uld_jax.main --config configs/meld.py:tiny --workdir runs/meld_tiny
    python -m uld_jax.main --config configs/meld.py:paper --workdir runs/meld
"""

from configs import common


def get_config(arg: str | None = None):
    return common.base_config(common.parse_variant(arg))
