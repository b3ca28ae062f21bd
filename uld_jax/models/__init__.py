"""uld_jax.models: the MELD detector (DenseNet-FPN with 3D context fusion, per-dataset RPNs and box
regression, organ-gated classification heads, mask and embedding heads).

    from uld_jax.models import MELD, init_variables, model_config
"""

from uld_jax.models.config import model_config  # noqa: F401
from uld_jax.models.meld import MELD, init_variables  # noqa: F401
