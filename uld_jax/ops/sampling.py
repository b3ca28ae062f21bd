"""Fixed-count, foreground-first balanced sampling of labelled anchors/ROIs.

Detectron's rule with static shapes: take at most ``floor(num_samples * positive_fraction)``
positives uniformly at random, fill the remaining slots with random negatives, never sample
IGNORE rows. Randomness is one uniform draw per row from ``key`` and selection is ``lax.top_k``, so
the result is deterministic for a key and costs O(N log k) regardless of how many rows are valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from uld_jax.ops.matching import NEGATIVE, POSITIVE
from uld_jax.ops.nms import pad_slots

Array = jnp.ndarray

RPN_SAMPLES_PER_IMAGE: int = 32
RPN_POSITIVE_FRACTION: float = 0.5
ROI_SAMPLES_PER_IMAGE: int = 64
ROI_POSITIVE_FRACTION: float = 0.25


def sample_balanced(
    labels: Array, key: Array, num_samples: int, positive_fraction: float
) -> tuple[Array, Array]:
    """Sample one image's rows.

    Args:
      labels: [N] int32 NEGATIVE / POSITIVE / IGNORE (``uld_jax.ops.matching``).
      key: PRNG key.
      num_samples: static S, the number of output slots.
      positive_fraction: at most ``floor(S * positive_fraction)`` positives.

    Returns:
      ``(indices [S] int32, valid [S] bool)``: the sampled positives first (random order), then the
      sampled negatives, then invalid slots (index 0). The number of valid slots is
      ``min(P, max_pos) + min(Nn, S - min(P, max_pos))`` for P positives and Nn negatives.
    """
    labels = jnp.asarray(labels, jnp.int32)
    n = labels.shape[0]
    max_pos = int(num_samples * positive_fraction)
    pos = labels == POSITIVE
    neg = labels == NEGATIVE
    u = jax.random.uniform(key, (n,), jnp.float32)
    chosen_pos = jnp.zeros((n,), bool)
    if max_pos > 0 and n > 0:
        k = min(max_pos, n)
        _, pidx = lax.top_k(jnp.where(pos, u, -1.0), k)
        chosen_pos = chosen_pos.at[pidx].set(pos[pidx])
    # Positives rank in [2, 2.5), negatives in [1, 1.5), everything else below 0 (the halved draw
    # keeps the bands apart after float32 rounding).
    priority = jnp.where(chosen_pos, 2.0 + 0.5 * u, jnp.where(neg, 1.0 + 0.5 * u, -1.0))
    k = min(num_samples, n)
    top, idx = lax.top_k(priority, k)
    ok = top >= 1.0
    idx = jnp.where(ok, idx, 0).astype(jnp.int32)
    return pad_slots(idx, ok, num_samples)


def per_image_keys(key: Array, batch: int) -> Array:
    """[batch] keys, image b's is ``jax.random.fold_in(key, b)`` (the batch wrappers' convention)."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def sample_balanced_batch(
    labels: Array, key: Array, num_samples: int, positive_fraction: float
) -> tuple[Array, Array]:
    """:func:`sample_balanced` over a batch: labels [B, N], one key -> ([B, S], [B, S]).

    Each image gets ``jax.random.fold_in(key, b)``.
    """
    labels = jnp.asarray(labels)
    keys = per_image_keys(key, labels.shape[0])
    return jax.vmap(lambda l, k: sample_balanced(l, k, num_samples, positive_fraction))(labels, keys)
