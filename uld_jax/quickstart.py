"""The quick start: the whole method on the synthetic CT world, on this machine's CPU.

    python -m uld_jax.quickstart --out quickstart              # the README's main command runs this
    python -m uld_jax.quickstart --out /tmp/qs --recipe smoke  # the tiny world, a few steps a stage

Steps (each one a subprocess of the project's own CLIs; logs in ``OUT/logs/<step>.log``):

 1. ``world``     python -m data_prep.synthesize (the recipe's preset + count overrides)
 2. ``check``     python -m data_prep.check
 3. ``build``     python -m data_prep.build --pixel-mm (the tiny model's coarse pixels)
 4. ``baseline``  python -m uld_jax.main --config configs/baseline.py:tiny  (DeepLesion only)
 5. ``meld``      python -m uld_jax.main --config configs/meld.py:tiny      (4 datasets)
 6. ``mine``      python -m uld_jax.mine at the MELD checkpoint of epoch ``mine_epoch`` (MAM + NRM),
                  then ``mined_mam.npz`` / ``mined_nrm.npz``: the same table with only the MAM
                  positives / only the NRM rows (both keep the added unlabeled slices;
                  :func:`split_mined`)
 7. ``report``    python -m uld_jax.mine.report (mining precision against the world's truth)
 8. ``ft_mam``, ``ft_nrm``, ``ft_both``  python -m uld_jax.main --config configs/finetune.py:tiny
                  from the same MELD epoch, for the remaining epochs (the paper's protocol: MELD 8
                  epochs versus MELD 4 + finetuning 4, mining where the first lr phase ends; the
                  quick recipe's first phase is 6 of 8 epochs, since its model learns from scratch).
                  A finetune whose table holds the same rows as an earlier one's (MELD + MAM + NRM
                  when NRM marked no region) would train the same model bit for bit: it is that
                  run (``runs/ft_both`` a link to ``ft_mam``, ``same_as`` in its state, a note under
                  the table), not trained again
 9. ``eval_<run>`` python -m uld_jax.evaluate --workdir on the DeepLesion test split, volumetric
                  protocol (both hit rules) against the world's volumetric truth, organ strata
                  (lung, liver, lymph node) from the world's organ of every test lesion
                  (``OUT/organ_labels_test.json``)
10. ``table``     ``OUT/table1.md`` (+ ``.json``): Table-1-style sensitivities at 0.125 ... 8 FPs per
                  sub-volume, printed; FROC PNGs in ``OUT/eval/<run>/froc_volumetric.png``
11. ``overlays``  ``OUT/overlays/*.png``: test key slices with the truth (green) and the final
                  model's detections (red, score >= 0.5; the top 3 when none reaches it)

Resume: a finished step writes ``OUT/state/<step>.json`` (its command and wall time) and is skipped
when run again; an interrupted step is started again and resumes where its tool does (training
from its last checkpoint, building and mining by chunks; an incomplete world is synthesized anew).
Nothing here tunes on the test split: the recipe is fixed before evaluation.

Compilation cache: the steps' processes share JAX's persistent compilation cache in
``OUT/jax_cache`` (``--compile-cache``; ``JAX_COMPILATION_CACHE_DIR``, when set, is used instead;
``--compile-cache off`` turns it off). The three finetunes, the evaluations and the mining compile
the same programs; with the cache only the first process of each program compiles it. A cached
executable is the one XLA would compile again, so the results do not change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    preset: str
    world_args: tuple[str, ...]
    pixel_mm: float
    batch_size: int
    steps_per_epoch: int
    epochs: int            # baseline and MELD
    mine_epoch: int        # MELD checkpoint mined and finetuned from
    eval_batch: int = 4
    mine_every_mm: float = 5.0
    # config overrides of every training run (baseline, MELD, finetunes, ablations); the model is
    # saved with its config, so mining and evaluation rebuild the same one
    train_args: tuple[str, ...] = ()
    # True: the multi-dataset runs (MELD, its finetunes, Table 4's variants) take as many steps per
    # epoch as make them pass over each DeepLesion key slice as often as the baseline does (the
    # paper trains both for the same epochs over their own data); False: every run takes
    # steps_per_epoch, so MELD, whose mixing epoch is mostly single-type slices, sees DeepLesion
    # several times less often than the baseline
    equal_passes: bool = False


# The quick recipe's detector: the `tiny` config widened (DenseNet growth 16, 3/4/6 layers, 64-wide
# FPN and RPN; about 4x the tiny FLOPs, still seconds per step on 2 cores) with the paper's anchor
# sizes kept in millimetres: MULAN's 16-96 px at 0.8 mm are 8-48 px at the recipe's 2 mm pixels
# (the tiny default's 16-96 px anchors miss most lesions of 6-20 mm, which are 3-10 px here).
# Chosen on the quick world's DeepLesion train / val key slices (never the test split), key-slice
# FROC mean after 600 steps at lr 1e-3: baseline with the tiny default 5.0% / -, with the anchors
# 8.2% / 4.2%, widened 12.0% / 8.3%; MELD widened 16.7% / 12.5% (docs/results.md, "Recipe").
QUICK_MODEL_ARGS = (
    "--config.model.anchors.sizes=(8,12,16,24,48)",
    "--config.model.backbone.growth_rate=16",
    "--config.model.backbone.block_layers=(3,4,6)",
    "--config.model.backbone.num_init_features=32",
    "--config.model.fpn_dim=64",
    "--config.model.rpn.conv_dim=64",
)


RECIPES = {
    # The README's quick start: the `small` world with fewer DeepLesion patients and single-type
    # scans (same presets otherwise: 512 px matrices, 5/2/1 mm DeepLesion series, partial labels),
    # the tiny model at 2 mm pixels on a 160 px canvas.
    "quick": Recipe(name="quick", preset="small",
                    world_args=("--dl-patients", "36", "--luna", "8", "--lits", "4", "--nihln", "4"),
                    pixel_mm=2.0, batch_size=4, steps_per_epoch=60, epochs=8, mine_epoch=6,
                    train_args=QUICK_MODEL_ARGS),
    # The quick recipe's world and model trained 4x as long (32 epochs, mining and finetuning from
    # epoch 24): the recipe where the detector fits its training lesions. Chosen on the training
    # split: the quick recipe's baseline reaches a key-slice FROC mean of 7.7% on its own DeepLesion
    # training key slices after 8 epochs, 58.7% after 32 (docs/results.md, "Learning check").
    # About 50 minutes a seed on 2 idle cores; for `python -m uld_jax.reproduce --recipe long`.
    "long": Recipe(name="long", preset="small",
                   world_args=("--dl-patients", "36", "--luna", "8", "--lits", "4", "--nihln", "4"),
                   pixel_mm=2.0, batch_size=4, steps_per_epoch=60, epochs=32, mine_epoch=24,
                   train_args=QUICK_MODEL_ARGS),
    # The quick recipe with equal passes: MELD's runs take (MELD's mixing epoch / the baseline's
    # epoch) x 60 steps per epoch, computed from the built data (343 on the quick world: 543
    # samples, 95 of them DeepLesion key slices), so that both see each DeepLesion key slice about
    # 20 times. MELD then costs ~5.7x the baseline's steps (about 50 minutes a seed on 2 cores).
    "equal": Recipe(name="equal", preset="small",
                    world_args=("--dl-patients", "36", "--luna", "8", "--lits", "4", "--nihln", "4"),
                    pixel_mm=2.0, batch_size=4, steps_per_epoch=60, epochs=8, mine_epoch=6,
                    train_args=QUICK_MODEL_ARGS, equal_passes=True),
    # The smoke test: the `tiny` world, a few steps per stage.
    "smoke": Recipe(name="smoke", preset="tiny", world_args=(), pixel_mm=2.0, batch_size=2,
                    steps_per_epoch=2, epochs=2, mine_epoch=1, eval_batch=2),
}

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
RUNS = ("baseline", "meld", "ft_mam", "ft_nrm", "ft_both")
ROW_NAMES = {"baseline": "Baseline (DeepLesion only, MULAN-like)", "meld": "MELD",
             "ft_mam": "MELD + MAM", "ft_nrm": "MELD + NRM", "ft_both": "MELD + MAM + NRM"}
LABELS_FILE = "organ_labels_test.json"
# The finetunes and their tables in MELD's run folder (``split_mined``'s parts of ``mined.npz``).
FINETUNES = (("ft_mam", "mined_mam.npz"), ("ft_nrm", "mined_nrm.npz"), ("ft_both", "mined.npz"))


def split_mined(src: str, part: str, dst: str, data_dir: str,
                added: bool = True) -> dict[str, int]:
    """Writes the ``part`` of mined table ``src`` to ``dst``: ``'mam'`` its MAM positives (kind-1
    rows of the universal expert), ``'nrm'`` its NRM rows (rows of single-type experts: ignore
    regions, or positives when mined with ``--nrm_as_positive``), ``'both'`` both, ``'none'``
    nothing mined (the finetuning control); each with every added unlabeled slice (kind 3) unless
    ``added`` is false (a mined row on an added slice still brings its slice). Returns the rows
    written per kind."""
    from uld_jax.mine.run import UNIVERSAL_EXPERT
    from uld_jax.overlay import KIND_ADDED, KIND_IGNORE, KIND_MINED, read_overlay, write_overlay

    cols, meta = read_overlay(src)
    kind, expert = np.asarray(cols["kind"]), np.asarray(cols["expert"])
    if part == "mam":
        sel = (kind == KIND_MINED) & (expert == UNIVERSAL_EXPERT)
    elif part == "nrm":
        sel = np.isin(kind, (KIND_MINED, KIND_IGNORE)) & (expert != UNIVERSAL_EXPERT)
    elif part == "both":
        sel = np.isin(kind, (KIND_MINED, KIND_IGNORE))
    elif part == "none":
        sel = np.zeros(kind.shape, bool)
    else:
        raise ValueError(f"part {part!r}: expected 'mam', 'nrm', 'both' or 'none'")
    if added:
        sel |= kind == KIND_ADDED
    m = {k: v for k, v in meta.items() if k not in ("created", "tool_version")}
    m["quickstart_subset"] = (f"{part} rows and added slices of {src}" if added
                              else f"{part} rows of {src}, without the bare added slices")
    write_overlay(dst, {k: np.asarray(v)[sel] for k, v in cols.items()}, m, data_dir=data_dir)
    return {"mined": int((sel & (kind == KIND_MINED)).sum()),
            "ignore": int((sel & (kind == KIND_IGNORE)).sum()),
            "added": int((sel & (kind == KIND_ADDED)).sum())}


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def use_compile_cache(out: str, choice: str | None = None) -> str | None:
    """Points the processes this one starts at a persistent JAX compilation cache and returns its
    folder (None: off). ``choice``: a folder, ``'off'``, or None for the environment's
    ``JAX_COMPILATION_CACHE_DIR`` or else ``OUT/jax_cache``. Sets this process's environment, which
    the step subprocesses inherit (jax reads the variable when it is imported)."""
    if choice is not None and choice.strip().lower() == "off":
        os.environ.pop(CACHE_ENV, None)
        return None
    path = choice or os.environ.get(CACHE_ENV) or os.path.join(out, "jax_cache")
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    os.environ[CACHE_ENV] = path
    return path


def same_rows(a: str, b: str) -> bool:
    """Whether the overlay tables ``a`` and ``b`` hold the same rows (``Overlay.equal_rows``: their
    provenance aside, NaN equal to NaN). A missing file: False."""
    from uld_jax.mine import table

    if not (os.path.isfile(a) and os.path.isfile(b)):
        return False
    return table.read_overlay(a).equal_rows(table.read_overlay(b))


def state_file(out: str, step: str) -> str:
    """The record of quick-start output ``out``'s finished ``step`` (its existence = done); read
    without building a :class:`Quickstart`, which creates its folders."""
    return os.path.join(out, "state", f"{step}.json")


class Quickstart:
    def __init__(self, out: str, recipe: Recipe, seed: int = 0, quiet: bool = False,
                 data_from: str | None = None):
        """``seed``: the world's and the training runs' seed; ``data_from``: another quick start's
        folder whose world and build are reused (its world / check / build steps must be done;
        then ``seed`` only seeds training: the spread across training seeds on one world)."""
        self.out = os.path.abspath(out)
        self.r = recipe
        self.seed = int(seed)
        self.quiet = quiet
        for d in ("state", "logs", "runs", "eval"):
            os.makedirs(os.path.join(self.out, d), exist_ok=True)
        self.data_from = os.path.abspath(data_from) if data_from else None
        base = self.data_from or self.out
        self.world = os.path.join(base, "world")
        self.data = os.path.join(base, "data")
        self.t0 = time.time()
        self._compositions: dict[str, dict] = {}

    # -- bookkeeping --------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[quickstart {time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def _state(self, step: str) -> str:
        return state_file(self.out, step)

    def done(self, step: str) -> bool:
        return os.path.isfile(self._state(step))

    def mark(self, step: str, info: dict) -> None:
        tmp = self._state(step) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, self._state(step))

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, "runs", name)

    def eval_dir(self, run: str, protocol: str = "volumetric") -> str:
        return os.path.join(self.out, "eval" if protocol == "volumetric" else f"eval_{protocol}", run)

    @property
    def truth(self) -> str:
        return os.path.join(self.world, "truth", "deeplesion_volumetric_truth.pkl")

    @property
    def dl_info(self) -> str:
        return os.path.join(self.world, "DeepLesion", "DL_info.csv")

    @property
    def labels(self) -> str:
        return os.path.join(self.out, LABELS_FILE)

    def step(self, name: str, cmds: Sequence[Sequence[str]] = (), fn=None,
             info: dict | None = None) -> None:
        """Runs ``cmds`` (then ``fn``) unless ``name`` is finished; records the wall time (and
        ``info``)."""
        if self.done(name):
            self.say(f"{name}: done before, skipped")
            return
        self.say(f"{name}: running (log {self._log(name)})")
        t = time.time()
        with open(self._log(name), "a", encoding="utf-8") as log:
            for cmd in cmds:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
                rc = subprocess.call(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
                if rc != 0:
                    raise SystemExit(f"[quickstart] {name} failed (exit {rc}): {' '.join(cmd)}\n"
                                     f"  see {self._log(name)} (re-run the quick start to resume)")
        if fn is not None:
            fn()
        wall = time.time() - t
        self.mark(name, {"commands": [list(c) for c in cmds], "wall_s": round(wall, 1),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         **(info or {})})
        self.say(f"{name}: finished in {wall:.0f}s")

    def _log(self, name: str) -> str:
        return os.path.join(self.out, "logs", f"{name}.log")

    # -- the steps ----------------------------------------------------------------------------------
    def do_world(self) -> None:
        if self.data_from:
            for s in ("world", "check", "build"):
                if not os.path.isfile(os.path.join(self.data_from, "state", f"{s}.json")):
                    raise SystemExit(f"[quickstart] {self.data_from}: step {s} is not done")
            return
        if not self.done("world") and os.path.exists(self.world):
            shutil.rmtree(self.world)           # an interrupted synthesis: start it anew
        self.step("world", [[sys.executable, "-m", "data_prep.synthesize", "--preset", self.r.preset,
                             "--seed", str(self.seed), "--out", self.world, "--stats",
                             *self.r.world_args]])

    def do_check_build(self, datasets: Sequence[str] = ()) -> None:
        """Checks and builds the world (``datasets``: only those; default every one found)."""
        if self.data_from:
            return
        only = ["--datasets", ",".join(datasets)] if datasets else []
        self.step("check", [[sys.executable, "-m", "data_prep.check", "--raw", self.world, *only,
                             "--no-progress"]])
        self.step("build", [[sys.executable, "-m", "data_prep.build", "--raw", self.world, "--out",
                             self.data, *only, "--pixel-mm", str(self.r.pixel_mm),
                             "--no-progress"]])

    def steps_per_epoch(self, config: str) -> int:
        """Steps per epoch of a run of ``config``: the recipe's, or with ``equal_passes`` for a
        multi-dataset config (anything but the baseline) the recipe's scaled by the ratio of MELD's
        mixing epoch to the baseline's (``input_pipeline.epoch_composition`` of the built data)."""
        r = self.r
        if not r.equal_passes or config == "baseline":
            return r.steps_per_epoch
        from uld_jax.input_pipeline import epoch_length

        base = epoch_length(self.composition("baseline"))
        if base <= 0:
            raise SystemExit(f"[quickstart] {self.data}: the baseline's epoch is empty")
        return max(1, int(round(r.steps_per_epoch * epoch_length(self.composition("meld")) / base)))

    def composition(self, config: str) -> dict[str, dict[str, int]]:
        """``input_pipeline.epoch_composition`` of ``configs/<config>.py:tiny`` on the built data
        (read once per config: every training command of a run asks)."""
        if config not in self._compositions:
            import importlib

            from uld_jax import input_pipeline as ip

            d = importlib.import_module(f"configs.{config}").get_config("tiny").data
            d.data_dir = self.data
            self._compositions[config] = ip.epoch_composition(d)
        return self._compositions[config]

    def _train_cmd(self, config: str, run: str, *extra: str) -> list[str]:
        r = self.r
        spe = self.steps_per_epoch(config)
        return [sys.executable, "-m", "uld_jax.main", "--config", f"configs/{config}.py:tiny",
                "--workdir", self.run_dir(run), f"--config.data.data_dir={self.data}",
                f"--config.seed={self.seed}", f"--config.batch_size={r.batch_size}",
                f"--config.steps_per_epoch={spe}",
                f"--config.log_every_steps={max(1, spe // 2)}", *r.train_args, *extra]

    def _decays(self, start: int = 0) -> str:
        """The ``optimizer.decay_epochs`` override of a run starting at epoch ``start`` of the
        recipe's schedule: x0.1 after the mining epoch and after the next-to-last epoch (the end,
        when that is the mining epoch), counted from ``start``; decays before it are dropped."""
        r = self.r
        second = r.epochs - 1 if r.epochs - 1 > r.mine_epoch else r.epochs
        decays = [d - start for d in (r.mine_epoch, second) if d > start]
        return ("--config.optimizer.decay_epochs=(" + ",".join(map(str, decays))
                + ("," if len(decays) == 1 else "") + ")")

    def scratch_cmd(self, config: str, run: str, *extra: str) -> list[str]:
        """Training from scratch for the recipe's epochs (baseline, MELD and Table 4's variants)."""
        return self._train_cmd(config, run, f"--config.num_epochs={self.r.epochs}",
                               self._decays(), *extra)

    def finetune_cmd(self, run: str, overlay: str, *extra: str) -> list[str]:
        """Finetuning from MELD's epoch ``mine_epoch`` for the remaining epochs on ``overlay``."""
        r = self.r
        return self._train_cmd(
            "finetune", run, f"--config.num_epochs={r.epochs - r.mine_epoch}",
            f"--config.init_from.workdir={self.run_dir('meld')}",
            f"--config.init_from.epoch={r.mine_epoch}",
            f"--config.optimizer.decay_epochs=({max(1, (r.epochs - r.mine_epoch) // 2)},)",
            f"--config.data.overlays=('{overlay}',)", *extra)

    def resume_cmd(self, run: str, *extra: str) -> list[str]:
        """MELD's second half again: its own command from its checkpoint at half its epochs (the
        paper's finetuning start, epoch 4 of 8), with its learning rate and decays for the
        remaining epochs and a fresh optimizer (``init_from``)."""
        half = self.r.epochs // 2
        return self._train_cmd(
            "meld", run, f"--config.num_epochs={self.r.epochs - half}",
            f"--config.init_from.workdir={self.run_dir('meld')}",
            f"--config.init_from.epoch={half}", self._decays(half), *extra)

    def mine_cmd(self, *extra: str, run: str = "meld", step: int | None = None) -> list[str]:
        """Mining MELD's epoch-``mine_epoch`` checkpoint (its chunk store is shared by every call
        that does not name its own ``--store_dir``), or ``run``'s checkpoint ``step``."""
        r = self.r
        at = ["--epoch", str(r.mine_epoch)] if step is None else ["--step", str(step)]
        return [sys.executable, "-m", "uld_jax.mine", "--workdir", self.run_dir(run), *at,
                "--every_mm", str(r.mine_every_mm), "--batch_per_device", str(r.eval_batch),
                "--progress", "off", *extra]

    def eval_cmd(self, run: str, protocol: str = "volumetric", split: str = "test",
                 on: "Quickstart | None" = None, out: str | None = None,
                 step: int | None = None) -> list[str]:
        """``run`` on a DeepLesion split (the test split unless asked): volumetric (both hit rules,
        organ strata) or key slices. Another split's results go to ``eval_<protocol>_<split>``.
        ``on``: another quick start whose world and build (and organ labels) are evaluated on,
        into ``out``. ``step``: that checkpoint of the run instead of its last."""
        src = on or self
        if out is None:
            out = self.eval_dir(run, protocol)
            if split != "test":
                out = os.path.join(self.out, f"eval_{protocol}_{split}", run)
        model = (["--workdir", self.run_dir(run)] if step is None else
                 ["--checkpoint", os.path.join(self.run_dir(run), "checkpoints", str(int(step)))])
        cmd = [sys.executable, "-m", "uld_jax.evaluate", *model, "--data", src.data,
               "--datasets", "deeplesion", "--split", split, "--protocol", protocol,
               "--batch-size", str(self.r.eval_batch), "--out", out]
        if protocol == "volumetric":
            cmd += ["--truth", src.truth, "--dl-info", src.dl_info, "--labels", src.labels,
                    "--rule", "both"]
        return cmd

    def eval_step(self, run: str) -> None:
        """The volumetric evaluation of ``run`` (step ``eval_<run>``); one finished before organ
        strata were reported is run again."""
        name = f"eval_{run}"
        res = os.path.join(self.eval_dir(run), "results.json")
        if self.done(name) and not _has_strata(res):
            self.say(f"{name}: its results.json has no organ strata; evaluating again")
            os.remove(self._state(name))
        self.write_labels()
        self.step(name, [self.eval_cmd(run)])

    def write_labels(self) -> None:
        """``OUT/organ_labels_test.json``: the world's organ of every test truth box (lung, liver,
        lymph_node or other), for the evaluations' organ strata."""
        if os.path.isfile(self.labels):
            return
        from uld_jax.evaluate.inputs import load_volume_dict
        from uld_jax.evaluate.organs import organ_labels_from_world_truth

        lab = organ_labels_from_world_truth(load_volume_dict(self.truth, split="test"),
                                            os.path.join(self.world, "truth", "deeplesion_lesions.csv"))
        tmp = self.labels + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(lab, f, indent=0)
        os.replace(tmp, self.labels)

    def do_train(self) -> None:
        self.step("baseline", [self.scratch_cmd("baseline", "baseline")])
        self.step("meld", [self.scratch_cmd("meld", "meld")])

    def _split_overlay(self) -> None:
        src = os.path.join(self.run_dir("meld"), "mined.npz")
        mam = split_mined(src, "mam", os.path.join(self.run_dir("meld"), "mined_mam.npz"), self.data)
        nrm = split_mined(src, "nrm", os.path.join(self.run_dir("meld"), "mined_nrm.npz"), self.data)
        self.say(f"mine: {mam['mined']} MAM positives, {nrm['ignore']} NRM ignore regions, "
                 f"{mam['added']} added unlabeled slices")

    def report_cmd(self, name: str = "") -> list[str]:
        """The mining report of MELD's table ``mined<name>.npz`` (``mining_report<name>``)."""
        meld = self.run_dir("meld")
        return [sys.executable, "-m", "uld_jax.mine.report", "--workdir", meld, "--truth",
                os.path.join(self.world, "truth"), "--overlay",
                os.path.join(meld, f"mined{name}.npz"), "--out",
                os.path.join(meld, f"mining_report{name}")]

    def do_mine(self) -> None:
        self.step("mine", [self.mine_cmd()], fn=self._split_overlay)
        self.step("report", [self.report_cmd()])

    def do_finetune(self) -> None:
        for run, ov in FINETUNES:
            self.finetune(run, os.path.join(self.run_dir("meld"), ov))

    def finetune(self, run: str, table: str, *extra: str) -> None:
        """Step ``run``: MELD finetuned on ``table`` (:meth:`finetune_cmd`). A finetune whose
        command is an earlier finished one's (its run folder and table aside) and whose table holds
        that one's rows would train the same model bit for bit (the finetuning is deterministic;
        MELD + MAM + NRM when NRM marked no region): it is not trained again but is that run,
        ``runs/<run>`` a relative link to it, its state recording ``same_as``."""
        if not self.done(run):
            twin = self._trained_twin(table, extra)
            if twin is not None:
                self.step(run, fn=lambda: self._link_run(run, twin), info={"same_as": twin})
                return
            if os.path.islink(self.run_dir(run)):
                os.remove(self.run_dir(run))          # a twin of an earlier mining's tables
        self.step(run, [self.finetune_cmd(run, table, *extra)],
                  info={"finetune": {"table": table, "extra": list(extra)}})

    def _trained_twin(self, table: str, extra: Sequence[str]) -> str | None:
        """The first finished, trained finetune (by name) with these ``extra`` options whose table
        holds the same rows as ``table``."""
        state = os.path.join(self.out, "state")
        for name in sorted(os.listdir(state)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(state, name), encoding="utf-8") as f:
                ft = json.load(f).get("finetune")
            if ft and ft["extra"] == list(extra) and same_rows(ft["table"], table):
                return name[:-len(".json")]
        return None

    def _link_run(self, run: str, twin: str) -> None:
        dst = self.run_dir(run)
        if os.path.islink(dst):
            os.remove(dst)
        elif os.path.isdir(dst):
            shutil.rmtree(dst)               # an interrupted training on the same table
        os.symlink(twin, dst)                # relative: OUT can be moved
        self.say(f"{run}: its table holds the same rows as {twin}'s; runs/{run} is that run")

    def twins(self) -> dict[str, str]:
        """{run: the run it is} for the finetunes that were not trained again (``same_as``)."""
        out = {}
        for run, _ in FINETUNES:
            if self.done(run):
                with open(self._state(run), encoding="utf-8") as f:
                    same = json.load(f).get("same_as")
                if same:
                    out[run] = same
        return out

    def do_evaluate(self) -> None:
        for run in RUNS:
            self.eval_step(run)

    # -- the table ----------------------------------------------------------------------------------
    def do_table(self) -> None:
        self.step("table", fn=self._table)
        with open(os.path.join(self.out, "table1.md"), encoding="utf-8") as f:
            print(f.read(), flush=True)

    def _table(self) -> None:
        from uld_jax.quickstart_table import table1

        md, js = table1(self.out, RUNS, ROW_NAMES, self.recipe_summary(), twins=self.twins())
        with open(os.path.join(self.out, "table1.md"), "w", encoding="utf-8") as f:
            f.write(md)
        with open(os.path.join(self.out, "table1.json"), "w", encoding="utf-8") as f:
            json.dump(js, f, indent=1)

    def recipe_summary(self) -> dict:
        return {**dataclasses.asdict(self.r), "seed": self.seed,
                "step_wall_s": {n[:-5]: json.load(open(os.path.join(self.out, "state", n), encoding="utf-8"))["wall_s"]
                                for n in sorted(os.listdir(os.path.join(self.out, "state")))
                                if n.endswith(".json")}}

    def do_overlays(self) -> None:
        self.step("overlays", fn=self._overlays)

    def _overlays(self, max_images: int = 8) -> None:
        from uld_jax.quickstart_table import overlay_pngs

        paths = overlay_pngs(self.run_dir("ft_both"), self.data, os.path.join(self.out, "overlays"),
                             max_images=max_images, batch_size=self.r.eval_batch)
        self.say(f"overlays: {len(paths)} PNGs in {os.path.join(self.out, 'overlays')}")

    def run(self) -> None:
        self.do_world()
        self.do_check_build()
        self.do_train()
        self.do_mine()
        self.do_finetune()
        self.do_evaluate()
        self.do_table()
        self.do_overlays()
        self.say(f"all done: {self.out}/table1.md, {self.out}/eval/*/froc_volumetric.png, "
                 f"{self.out}/overlays/")


def _has_strata(results_json: str) -> bool:
    try:
        with open(results_json, encoding="utf-8") as f:
            return bool(json.load(f).get("strata"))
    except (OSError, ValueError):
        return False


def add_compile_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache, shared by the steps' processes "
                   f"(default: ${CACHE_ENV} when set, else OUT/jax_cache; 'off': none)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart", help="output folder (re-run to resume)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="quick")
    p.add_argument("--seed", type=int, default=0, help="world and training seed")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="override the recipe's")
    p.add_argument("--data-from", default=None,
                   help="another quick start's OUT whose world and build to reuse (training seeds)")
    add_compile_cache_arg(p)
    a = p.parse_args(argv)
    r = RECIPES[a.recipe]
    if a.steps_per_epoch:
        r = dataclasses.replace(r, steps_per_epoch=int(a.steps_per_epoch))
    use_compile_cache(os.path.abspath(a.out), a.compile_cache)    # before the chdir: paths as given
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # configs/ are relative
    absp = lambda x: x if os.path.isabs(x) else os.path.join(_CALLER_CWD, x)  # noqa: E731
    Quickstart(absp(a.out), r, a.seed, data_from=absp(a.data_from) if a.data_from else None).run()
    return 0


_CALLER_CWD = os.getcwd()

if __name__ == "__main__":
    sys.exit(main())
