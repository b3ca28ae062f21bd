"""``python -m uld_jax.evaluate``: offline evaluation of prediction files against truth files.

Volumetric (DeepLesion 1K protocol, both hit rules)::

    python -m uld_jax.evaluate --pred PRED.pkl|.npz|.json --truth DeepLesion_manual_1K_test_release.pkl
        [--split test] [--rule both|released|paper] [--labels LABELS.json | --dl-info DL_info.csv]
        [--slice-boxes SB.npz] [--fp-rates 0.125,...,8] [--out DIR] [--tb DIR]

    PRED: {sub-volume: n x 7 [x1,y1,z1,x2,y2,z2,score]} (optionally split-nested like the truth), or
    with --pred-2d: {sub-volume: n x 6 [z,x1,y1,x2,y2,score]} per-slice 2D detections, stacked here.

Key slices (MULAN): ``--protocol keyslice --pred P --truth T`` with {image: n x 5} / {image: n x 4}.

LUNA16::

    python -m uld_jax.evaluate --protocol luna16 --pred candidates.csv --truth annotations.csv
        [--excluded annotations_excluded.csv] [--seriesuids seriesuids.csv] [--out DIR]

    (--excluded / --seriesuids default to the files of those names next to --truth; --truth may
    also be the folder holding the three files.)

From a trained workdir on a built TFDS split (runs inference first; see from_workdir.py)::

    python -m uld_jax.evaluate --workdir RUN --data DATA_DIR [--split test]
        [--protocol keyslice|volumetric|luna16] [--truth TRUTH] [--dl-info DL_info.csv]
        [--labels LABELS.json] [--datasets deeplesion,...] [--expert NAME] [--batch-size 4]
        [--precise-bn N [--precise-bn-datasets deeplesion,...] [--precise-bn-data TRAIN_DATA]]

    (volumetric: --dl-info gives DeepLesion's geometry and, without --labels, organ strata of the
    marked lesions; --labels gives a label per truth box, e.g. the synthetic world's full truth;
    --precise-bn: BatchNorm statistics recomputed from N training batches, see precise_bn.py.)

Writes results.json, results.md and froc_<protocol>.png to --out (atomically), prints the Markdown
table, and with --tb DIR logs the scalars through clu metric_writers. Malformed inputs exit with
status 2 and a message naming the file, key or row.
"""

from __future__ import annotations

import argparse
import os
import sys

from uld_jax.evaluate.boxes import EvaluationInputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uld_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", default=None, help="prediction file (.pkl/.npz/.json, or candidates .csv for luna16)")
    p.add_argument("--workdir", default=None, help="trained workdir: run inference on --data first (instead of --pred)")
    p.add_argument("--checkpoint", default=None, help="one checkpoint WORKDIR/checkpoints/<step> (instead of --workdir)")
    p.add_argument("--data", default=None, help="with --workdir: DATA_DIR of python -m data_prep.build")
    p.add_argument("--datasets", default=None, help="with --workdir: comma-separated built datasets")
    p.add_argument("--expert", default=None, help="with --workdir: dataset expert (default: each dataset's own)")
    p.add_argument("--batch-size", type=int, default=4, help="with --workdir: images per compiled batch")
    p.add_argument("--save-pred", default=None,
                   help="with --workdir, volumetric: also write the per-slice detections to this .npz "
                        "(re-read with --pred FILE --pred-2d, or by python -m uld_jax.evaluate.bootstrap)")
    p.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="with --workdir: evaluate with BatchNorm statistics recomputed from N of the "
                        "run's training batches instead of its running averages (bn_mode 'batch')")
    p.add_argument("--precise-bn-datasets", default=None,
                   help="with --precise-bn: draw those batches from these datasets only (comma-separated)")
    p.add_argument("--precise-bn-data", default=None,
                   help="with --precise-bn: the built training data (default: the folder the run's "
                        "config records; --data may be another world without a train split)")
    p.add_argument("--truth", default=None, help="truth file (1K-set structure), or LUNA16 annotations.csv / folder")
    p.add_argument("--protocol", choices=("volumetric", "keyslice", "luna16"), default=None,
                   help="default: luna16 when --pred is a .csv, else volumetric")
    p.add_argument("--out", default=None, help="output folder for results.json / results.md / froc_*.png")
    p.add_argument("--split", default=None, help="split of split-nested files (default: test)")
    p.add_argument("--rule", choices=("both", "released", "paper"), default="both", help="volumetric hit rule(s)")
    p.add_argument("--pred-2d", action="store_true", help="PRED holds per-slice 2D detections n x 6 [z,x1,y1,x2,y2,score]")
    p.add_argument("--stack-iou", type=float, default=0.5, help="IoU (strict) linking 2D boxes on consecutive slices")
    p.add_argument("--score-mode", choices=("max", "mean"), default="max", help="3D score from the linked 2D scores")
    p.add_argument("--slice-boxes", default=None, help="per-slice boxes of the 3D detections {name: m x 6 [det,z,x1,y1,x2,y2]}")
    p.add_argument("--labels", default=None, help="organ label per truth row {name: [label, ...]} for strata")
    p.add_argument("--dl-info", default=None,
                   help="DL_info csv: organ strata from the marked lesions' Coarse_lesion_type (see organs.py)")
    p.add_argument("--missing-as-empty", action="store_true", help="truth volumes absent from PRED have no detections")
    p.add_argument("--metric", choices=("iou", "iobb", "iogt", "iobbgt"), default="iou", help="key-slice overlap")
    p.add_argument("--threshold", type=float, default=0.5, help="key-slice overlap threshold (>=)")
    p.add_argument("--excluded", default=None, help="LUNA16 annotations_excluded.csv")
    p.add_argument("--seriesuids", default=None, help="LUNA16 seriesuids.csv")
    p.add_argument("--max-marks", type=int, default=100, help="LUNA16 marks kept per scan (<= 0: no cap)")
    p.add_argument("--fp-rates", default=None,
                   help="comma-separated FP rates (default: 1/8..8 volumetric, 0.5..16 key slices)")
    p.add_argument("--tb", default=None, help="also log scalars with clu metric_writers into this folder")
    p.add_argument("--step", type=int, default=0, help="step for --tb")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def _run_workdir(args: argparse.Namespace):
    from uld_jax.evaluate.from_workdir import evaluate_workdir

    if not args.data:
        raise EvaluationInputError("--workdir needs --data DATA_DIR")
    rates = tuple(float(x) for x in args.fp_rates.split(",")) if args.fp_rates else None
    reps = evaluate_workdir(args.workdir, args.data, checkpoint=args.checkpoint, split=args.split or "test",
                            protocol=args.protocol, truth=args.truth,
                            datasets=args.datasets.split(",") if args.datasets else None, expert=args.expert,
                            batch_size=args.batch_size, dl_info=args.dl_info, stack_iou=args.stack_iou,
                            fp_rates=rates, max_marks=args.max_marks, labels=args.labels,
                            save_pred=args.save_pred, precise_bn=args.precise_bn,
                            precise_bn_datasets=(args.precise_bn_datasets.split(",")
                                                 if args.precise_bn_datasets else None),
                            precise_bn_data=args.precise_bn_data)
    return reps


def _run(args: argparse.Namespace):
    from uld_jax.evaluate import inputs, report

    if args.pred is None or args.truth is None:
        raise EvaluationInputError("give --pred and --truth, or --workdir and --data")

    protocol = args.protocol or ("luna16" if args.pred.lower().endswith(".csv") else "volumetric")
    if protocol == "luna16":
        from uld_jax.evaluate.luna import luna16_froc_from_files

        truth = args.truth
        folder = truth if os.path.isdir(truth) else os.path.dirname(os.path.abspath(truth))
        ann = os.path.join(truth, "annotations.csv") if os.path.isdir(truth) else truth
        exc = args.excluded or os.path.join(folder, "annotations_excluded.csv")
        sids = args.seriesuids or os.path.join(folder, "seriesuids.csv")
        r = luna16_froc_from_files(args.pred, ann, exc, sids, max_marks=args.max_marks)
        return report.evaluate_luna16(r, sources={"candidates": args.pred, "annotations": ann,
                                                  "excluded": exc, "seriesuids": sids})
    rates = None
    if args.fp_rates:
        try:
            rates = tuple(float(x) for x in args.fp_rates.split(","))
        except ValueError:
            raise EvaluationInputError(f"--fp-rates: {args.fp_rates!r} is not a comma-separated list of numbers") from None
        if any(r <= 0 for r in rates) or list(rates) != sorted(rates):
            raise EvaluationInputError(f"--fp-rates: {args.fp_rates!r} must be positive and increasing")
    truth = inputs.load_volume_dict(args.truth, split=args.split)
    pred = inputs.load_volume_dict(args.pred, split=args.split)
    if protocol == "keyslice":
        labels = inputs.load_labels(args.labels, split=args.split) if args.labels else None
        if rates is not None:
            kwr = {"fp_rates": rates}
        else:
            kwr = {}
        return report.evaluate_keyslice(truth, pred, metric=args.metric, threshold=args.threshold, **kwr,
                                        missing_as_empty=args.missing_as_empty, truth_labels=labels,
                                        pred_source=args.pred, truth_source=args.truth)
    rules = ("released", "paper") if args.rule == "both" else (args.rule,)
    labels = inputs.load_labels(args.labels, split=args.split) if args.labels else None
    if args.dl_info:
        if labels is not None:
            raise EvaluationInputError("give --labels or --dl-info, not both")
        from uld_jax.evaluate.organs import organ_labels_from_dl_info

        labels, _ = organ_labels_from_dl_info(truth, args.dl_info)
    sb = inputs.load_volume_dict(args.slice_boxes, split=args.split) if args.slice_boxes else None
    kw = dict(rules=rules, truth_labels=labels, missing_as_empty=args.missing_as_empty,
              pred_source=args.pred, truth_source=args.truth)
    if rates is not None:
        kw["fp_rates"] = rates
    if args.pred_2d:
        return report.evaluate_predictions(truth, slice_detections=pred, stack_iou=args.stack_iou,
                                           score_mode=args.score_mode, **kw)
    return report.evaluate_predictions(truth, pred, slice_boxes=sb, **kw)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.save_pred and not (args.workdir or args.checkpoint):
            raise EvaluationInputError("--save-pred needs --workdir or --checkpoint "
                                       "(with --pred the detections are already in a file)")
        if args.precise_bn and not (args.workdir or args.checkpoint):
            raise EvaluationInputError("--precise-bn needs --workdir or --checkpoint (a model to run)")
        for flag in ("precise_bn_datasets", "precise_bn_data"):
            if getattr(args, flag) and not args.precise_bn:
                raise EvaluationInputError(f"--{flag.replace('_', '-')} needs --precise-bn N")
        reps = _run_workdir(args) if (args.workdir or args.checkpoint) else [_run(args)]
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for rep in reps:
        out = args.out
        if out and len(reps) > 1:
            out = os.path.join(out, rep.info.get("dataset", rep.protocol))
        print(rep.to_markdown())
        if out:
            for p in rep.write(out, plot=not args.no_plot):
                print(f"wrote {p}")
        if args.tb:
            rep.log_to_clu(args.tb, step=args.step)
            print(f"logged {len(rep.scalars())} scalars to {args.tb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
