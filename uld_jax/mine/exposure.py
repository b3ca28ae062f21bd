"""How many of a model's sampled training negatives an annotation table's ignore regions keep out.

NRM can change training only through the negatives it removes: an anchor or ROI whose IoBB with an
ignore region exceeds ``roi.ignore_iobb`` is neither a positive nor a negative. This tool measures
that number for a trained run and a table of ignore regions (NRM's own, or the oracle's boxes as
ignore regions, ``python -m uld_jax.mine.oracle --as ignore``, which is every lesion the
annotations miss):

* the run's checkpoint, and its training data (the run's input config, DeepLesion only) with the
  table overlaid: its mined positives stay positives, its added unlabeled slices are drawn at
  ``--added_ratio`` x the key slices, as in training;
* the model's training forward (RPN anchor sampling, proposals, ROI sampling; the rng stream of
  training) on those batches with the table's ignore regions switched off, i.e. the negatives this
  model would be trained with without the table;
* every sampled negative anchor and ROI inside one of the table's ignore regions is one that the
  table would have kept out of the negatives. Counted apart on key slices and on added slices.

    python -m uld_jax.mine.exposure --workdir RUN --overlay TABLE.npz [--batches 100] \\
        [--added_ratio 0.5] [--sample roi.batch_per_image=64 ...] [--out exposure.json]

``--sample KEY=VALUE`` (repeatable) measures the same checkpoint under another sampling of the
training forward: how many anchors and proposals are drawn and kept (``SAMPLING_KEYS``; none of
them changes a parameter's shape). The question it answers: would a recipe that samples more of the
proposals as ROIs, as the paper's does, put more of its negatives on the unmarked lesions?

The output (JSON, and a table on stdout) has, per slice kind: slices, ignore regions, sampled
positive and negative ROIs and anchors, the negatives inside an ignore region (by IoBB, the rule
training applies; ROIs also by IoU >= 0.5, a negative that covers the lesion), the ignore regions
that at least one sampled negative ROI covered (IoU >= 0.5), and the negatives' classification
loss (the training loss's own per-box terms) with the part of it inside the regions: a hard
negative on a lesion weighs more than its count.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np

DATASET = "deeplesion"
COVER_IOU = 0.5                   # a negative ROI with this IoU with an ignore region covers it
KINDS = ("key", "added")
FIELDS = ("slices", "slices_with_regions", "ignore_regions", "roi_positives", "roi_negatives",
          "roi_negatives_in_region", "roi_negatives_covering", "regions_covered",
          "anchor_positives", "anchor_negatives", "anchor_negatives_in_region")
# the classification loss of those negatives (summed; the training loss's own per-box terms: the
# organ-weighted sigmoid cross-entropy of the ROI heads, the RPN's objectness cross-entropy)
LOSS_FIELDS = ("roi_negative_loss", "roi_negative_loss_in_region", "anchor_negative_loss",
               "anchor_negative_loss_in_region")


# the model config's sampling sizes that --sample may change (the parameters do not depend on them)
SAMPLING_KEYS = {"rpn.batch_per_image": int, "rpn.positive_fraction": float,
                 "rpn.pre_nms_train": int, "rpn.post_nms_train": int,
                 "roi.batch_per_image": int, "roi.positive_fraction": float}


class ExposureError(ValueError):
    """Input that cannot be measured; the message names the file or option."""


def parse_sampling(items: Sequence[str]) -> dict[str, int | float]:
    """``['roi.batch_per_image=64', ...]`` -> ``{'roi.batch_per_image': 64, ...}``; a key outside
    ``SAMPLING_KEYS``, a value that is not a positive number (a fraction in (0, 1]) or a key given
    twice is an :class:`ExposureError` naming it."""
    out: dict[str, int | float] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in SAMPLING_KEYS:
            raise ExposureError(f"--sample {item!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(sorted(SAMPLING_KEYS))}")
        if key in out:
            raise ExposureError(f"--sample {key}: given twice")
        kind = SAMPLING_KEYS[key]
        try:
            v = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ExposureError(f"--sample {item!r}: {value!r} is not {what}") from None
        if not (v > 0 and (kind is int or v <= 1)):
            bound = "> 0" if kind is int else "in (0, 1]"
            raise ExposureError(f"--sample {item!r}: must be {bound}")
        out[key] = v
    return out


def with_sampling(loaded, sampling: dict[str, int | float]):
    """``loaded`` (an ``inference.LoadedModel``) with its model rebuilt under ``sampling``'s sizes;
    the variables are the same (no sampling size changes a parameter's shape)."""
    import dataclasses

    from uld_jax.models.meld import MELD

    if not sampling:
        return loaded
    mcfg = loaded.model_config.copy_and_resolve_references()
    for key, v in sampling.items():
        group, name = key.split(".")
        mcfg[group][name] = v
    return dataclasses.replace(loaded, model=MELD(mcfg), model_config=mcfg)


def sampling_of(model_config) -> dict[str, int | float]:
    """The model config's values of every ``SAMPLING_KEYS`` entry (recorded with a result)."""
    return {k: model_config[k.split(".")[0]][k.split(".")[1]] for k in sorted(SAMPLING_KEYS)}


def input_config(data_config, data_dir: str, overlay: str, batch_size: int, seed: int,
                 added_ratio: float | None):
    """The run's training input config, DeepLesion only, with ``overlay`` as its only table."""
    import ml_collections

    c = ml_collections.ConfigDict(data_config.to_dict())
    c.data_dir = data_dir
    c.datasets = (DATASET,)
    c.split = "train"
    c.samples_version = ""
    c.overlays = (overlay,)
    if added_ratio is not None:
        c.added_ratio = float(added_ratio)
    c.global_batch_size = int(batch_size)
    c.seed = int(seed)
    c.num_epochs = -1
    c.image_size = tuple(int(v) for v in c.image_size)
    return c


def _counter(model, model_config, ignore_iobb: float, keep_regions: bool = False):
    """A jitted ``(variables, batch, rng) -> per-sample counts`` of the training forward with the
    batch's ignore regions switched off (``keep_regions``: left on, as training uses them; then no
    sampled negative should lie in one, which the tests check)."""
    import jax
    import jax.numpy as jnp

    from uld_jax import losses
    from uld_jax.core import Keys
    from uld_jax.models import detops
    from uld_jax.ops import boxes as box_ops

    a = model_config.anchors

    def count(variables, batch, rng):
        ign, ign_valid = batch[Keys.IGNORE_BOXES], batch[Keys.IGNORE_VALID]
        off = dict(batch)
        if not keep_regions:
            off[Keys.IGNORE_VALID] = jnp.zeros_like(ign_valid)
        other = [k for k in variables if k != "params"]
        out = model.apply(variables, off, train=True, rngs={"sample": rng}, mutable=other)[0]
        _, h, w, _ = batch[Keys.IMAGE].shape
        anchors = jnp.asarray(detops.anchor_grid(h // a.stride, w // a.stride, a.stride, a.sizes,
                                                 a.ratios))
        if anchors.shape[0] != out["rpn_labels"].shape[1]:
            raise ExposureError(f"{anchors.shape[0]} anchors for {out['rpn_labels'].shape[1]} RPN "
                                "outputs: the image size is not a multiple of the anchor stride")

        # the training loss's own per-box classification terms (summed over negatives below)
        roi_loss = losses.roi_cls_terms(out, model_config)[1]                  # [B, S]
        rpn_loss = losses.rpn_cls_terms(out)                                     # [B, N]

        def one(rois, roi_labels, rpn_labels, boxes, valid, rl, al):
            iobb = box_ops.pairwise_iobb(rois, boxes, roi_labels >= 0, valid)
            iou = box_ops.pairwise_iou(rois, boxes, roi_labels >= 0, valid)
            neg = roi_labels == 0
            r_in = neg & jnp.any(iobb > ignore_iobb, 1)
            covering = neg[:, None] & (iou >= COVER_IOU)
            a_neg = rpn_labels == 0
            a_in = a_neg & jnp.any(
                box_ops.pairwise_iobb(anchors, boxes, None, valid) > ignore_iobb, 1)
            return {
                "roi_negative_loss": jnp.sum(jnp.where(neg, rl, 0.0)),
                "roi_negative_loss_in_region": jnp.sum(jnp.where(r_in, rl, 0.0)),
                "anchor_negative_loss": jnp.sum(jnp.where(a_neg, al, 0.0)),
                "anchor_negative_loss_in_region": jnp.sum(jnp.where(a_in, al, 0.0)),
                "ignore_regions": jnp.sum(valid),
                "roi_positives": jnp.sum(roi_labels == 1),
                "roi_negatives": jnp.sum(neg),
                "roi_negatives_in_region": jnp.sum(r_in),
                "roi_negatives_covering": jnp.sum(jnp.any(covering, 1)),
                "regions_covered": jnp.sum(jnp.any(covering, 0)),
                "anchor_positives": jnp.sum(rpn_labels == 1),
                "anchor_negatives": jnp.sum(a_neg),
                "anchor_negatives_in_region": jnp.sum(a_in),
            }

        return jax.vmap(one)(out["roi_boxes"], out["roi_labels"], out["rpn_labels"], ign,
                             ign_valid, roi_loss, rpn_loss)

    return jax.jit(count)


def measure(workdir: str, overlay: str, *, data_dir: str | None = None, step: int | None = None,
            batches: int = 100, batch_size: int = 4, seed: int = 0,
            added_ratio: float | None = None,
            sampling: dict[str, int | float] | None = None) -> dict[str, Any]:
    """The counts (module docstring) over ``batches`` training batches of ``batch_size``, with the
    model's sampling sizes changed by ``sampling`` (``parse_sampling``'s output) if given."""
    import jax

    from uld_jax import inference, input_pipeline
    from uld_jax.core import Keys
    from uld_jax.mine import table

    if batches < 1 or batch_size < 1:
        raise ExposureError(f"--batches {batches} / --batch_size {batch_size}: must be >= 1")
    table.read_overlay(overlay)                  # names the file and field on a bad table
    loaded = with_sampling(inference.load_model(workdir=workdir, step=step), sampling or {})
    dcfg = loaded.data_config
    data_dir = data_dir or str(dcfg.get("data_dir", "") or "")
    if not data_dir:
        raise ExposureError(f"{workdir}: its config names no data_dir; pass --data_dir")
    cfg = input_config(dcfg, data_dir, overlay, batch_size, seed, added_ratio)
    count = _counter(loaded.model, loaded.model_config, float(loaded.model_config.roi.ignore_iobb))
    it = iter(input_pipeline.make_dataset(cfg))
    totals = {k: {**dict.fromkeys(FIELDS, 0), **dict.fromkeys(LOSS_FIELDS, 0.0)} for k in KINDS}
    rng = jax.random.key(seed)
    for i in range(batches):
        batch = next(it)
        got = jax.device_get(count(loaded.variables, {k: np.asarray(v) for k, v in batch.items()},
                                   jax.random.fold_in(rng, i)))
        key = np.asarray(batch[Keys.IS_KEY_SLICE], bool)
        for s in range(key.shape[0]):
            t = totals["key" if key[s] else "added"]
            t["slices"] += 1
            t["slices_with_regions"] += int(got["ignore_regions"][s] > 0)
            for f in FIELDS[2:]:
                t[f] += int(got[f][s])
            for f in LOSS_FIELDS:
                t[f] += float(got[f][s])
    return {"workdir": os.path.abspath(workdir), "step": loaded.step,
            "overlay": os.path.abspath(overlay), "data_dir": os.path.abspath(data_dir),
            "batches": batches, "batch_size": batch_size, "seed": seed,
            "added_ratio": float(cfg.added_ratio),
            "ignore_iobb": float(loaded.model_config.roi.ignore_iobb), "cover_iou": COVER_IOU,
            "sampling": sampling_of(loaded.model_config),
            "counts": totals}


def fractions(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per slice kind: the share of sampled negative ROIs / anchors inside an ignore region and
    of their classification loss, the share of negative ROIs covering a region, those ROIs against
    the sampled positive ROIs, and the share of regions some negative ROI covered."""
    out = {}
    for kind, c in result["counts"].items():
        def ratio(a, b):
            return float(c[a]) / c[b] if c[b] else float("nan")
        out[kind] = {"roi_negatives_in_region": ratio("roi_negatives_in_region", "roi_negatives"),
                     "roi_negatives_covering": ratio("roi_negatives_covering", "roi_negatives"),
                     "anchor_negatives_in_region": ratio("anchor_negatives_in_region",
                                                         "anchor_negatives"),
                     "covering_per_positive": ratio("roi_negatives_covering", "roi_positives"),
                     "roi_negative_loss_in_region": ratio("roi_negative_loss_in_region",
                                                          "roi_negative_loss"),
                     "anchor_negative_loss_in_region": ratio("anchor_negative_loss_in_region",
                                                             "anchor_negative_loss"),
                     "regions_covered": ratio("regions_covered", "ignore_regions")}
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    """The counts and shares as a markdown table (one row per slice kind)."""
    fr = fractions(result)
    lines = ["| slices | n | with regions | regions | positive ROIs | negative ROIs | in a region "
             "(IoBB) | covering one (IoU >= 0.5) | their share of the negatives' loss | negative "
             "anchors in a region | their share of the loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        c, f = result["counts"][kind], fr[kind]
        lines.append(
            f"| {kind} | {c['slices']} | {c['slices_with_regions']} | {c['ignore_regions']} | "
            f"{c['roi_positives']} | {c['roi_negatives']} | {c['roi_negatives_in_region']} "
            f"({f['roi_negatives_in_region']:.1%}) | {c['roi_negatives_covering']} "
            f"({f['roi_negatives_covering']:.1%}) | {f['roi_negative_loss_in_region']:.1%} | "
            f"{c['anchor_negatives_in_region']} of {c['anchor_negatives']} "
            f"({f['anchor_negatives_in_region']:.2%}) | {f['anchor_negative_loss_in_region']:.1%} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine.exposure",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run (its checkpoints/)")
    p.add_argument("--overlay", required=True, help="a table whose ignore regions are measured")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data_dir", default=None, help="the build's DATA_DIR (default: the run's)")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--added_ratio", type=float, default=None,
                   help="added slices per key slice drawn (default: the run's data.added_ratio)")
    p.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE",
                   help="measure under another sampling size of the training forward (repeatable; "
                   f"KEY one of {', '.join(sorted(SAMPLING_KEYS))})")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    a = p.parse_args(argv)
    from uld_jax.inference import ModelLoadError
    from uld_jax.io.atomic import atomic_write_json
    from uld_jax.mine.table import OverlayError
    try:
        res = measure(a.workdir, a.overlay, data_dir=a.data_dir, step=a.step, batches=a.batches,
                      batch_size=a.batch_size, seed=a.seed, added_ratio=a.added_ratio,
                      sampling=parse_sampling(a.sample))
    except (ExposureError, ModelLoadError, OverlayError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["fractions"] = fractions(res)
    print("\n".join(markdown(res)))
    if a.out:
        atomic_write_json(a.out, res, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
