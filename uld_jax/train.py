"""The training system: one jitted, donated, sharded train step; orbax checkpoints; clu metrics.

Everything model- or data-specific enters through two small interfaces, so the same loop trains
MELD on the grain pipeline, the MULAN-like baseline, the finetune on mined annotations, and the
small models of the tests.

Interfaces
----------
``Task`` (see :class:`Task`), three pure functions of arrays:

* ``init(rng, batch) -> variables``: a dict with ``"params"`` and any other collections (BatchNorm
  ``"batch_stats"``, ...). ``batch`` is a global batch (below); only its shapes should matter.
* ``loss_fn(params, other_variables, batch, rng, train) -> (loss, (new_other_variables, metrics))``:
  ``other_variables`` is ``variables`` without ``"params"``; ``loss`` a float32 scalar; ``metrics``
  a flat dict ``name -> value`` where a value is either a scalar (averaged over steps) or a pair
  ``(values, weights)`` of equal-shape arrays (a weighted mean pooled over the interval, e.g.
  per-sample losses with ``weights = dataset_id == d`` for a per-dataset loss; an interval in which
  all weights are 0 writes nothing). Names may contain ``/`` (TensorBoard groups by it), e.g.
  ``loss/cls/lung``, ``loss/rpn_cls/luna16``, ``gate/liver_mean``; they must not contain ``__``.
  ``rng`` is already folded with the step; ``train`` is a Python bool.
* ``eval_fn(params, other_variables, batch) -> metrics`` (optional; default: ``loss_fn`` with
  ``train=False`` and a fixed rng, its metrics plus ``loss``). Same metric convention.
* ``extra_eval(step, variables) -> dict[str, float]`` (optional, host side, run on every evaluation;
  the hook where detection metrics from ``uld_jax.evaluate`` plug in).

``Data`` (see :class:`Data`):

* ``train_iter(process_index, process_count)``: an endless iterator of *process-local* batches, dicts
  ``name -> np.ndarray`` with leading dimension ``config.batch_size // process_count`` (feature names
  from :class:`uld_jax.core.Keys`), with ``get_state() -> JSON-able dict`` and ``set_state(dict)``
  (grain's ``DatasetIterator`` has both). Its state after ``k`` batches must replay the same batches
  ``k+1, k+2, ...``: that is what makes a resumed run equal an uninterrupted one. Where process
  ``p`` of ``P`` yields rows ``[p*L, (p+1)*L)`` of each global batch (``L = B / P``), results do not
  depend on the process count either (the toy data does this; any partition of the data works).
* ``eval_iter(process_index, process_count)`` (optional): a fresh finite iterable of local batches of
  the same size (pad the last batch and mask it in ``eval_fn``).
* ``steps_per_epoch``: number of global batches in one epoch.

The loop
--------
``train_and_evaluate(config, workdir)`` builds a ``jax.sharding.Mesh`` with one axis ``'data'`` over
all devices of all processes, shards the batch on ``'data'`` and replicates the state, and runs
``train_step(state, batch, rng)`` jitted with ``in_shardings``/``out_shardings`` and the state
donated. Process-local batches become global arrays through
``jax.make_array_from_process_local_data``. Parameters are initialised from ``key(seed)``; the rng of
step ``s`` is ``fold_in(fold_in(key(seed), 1), s)``.
Checkpoints (``workdir/checkpoints/<step>``) hold the state (params, other variables, optimizer
state, step), the per-process data-iterator state and the config; a rerun on the same workdir resumes
from the latest. A non-finite loss or gradient stops training with :class:`NonFiniteLossError` before
anything later is saved (the step that produced it also leaves the state unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
Batch = Mapping[str, Any]
DATA_AXIS = "data"


# ------------------------------------------------------------------------------------------------
# Interfaces.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop needs from a model + loss (see the module docstring for the contract)."""

    init: Callable[[jax.Array, Batch], PyTree]
    loss_fn: Callable[..., tuple[jax.Array, tuple[PyTree, dict[str, Any]]]]
    eval_fn: Optional[Callable[[PyTree, PyTree, Batch], dict[str, Any]]] = None
    extra_eval: Optional[Callable[[int, PyTree], dict[str, float]]] = None


class StatefulIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Data:
    """Where batches come from (see the module docstring for the contract)."""

    train_iter: Callable[[int, int], StatefulIterator]
    steps_per_epoch: int
    eval_iter: Optional[Callable[[int, int], Iterable[dict[str, np.ndarray]]]] = None


class ConfigError(ValueError):
    """A config that cannot run (the message says which key to change); the CLI prints it as one
    line and exits with code 2."""


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss or gradient norm is NaN or Inf; nothing after it was saved."""


class _StopRequest:
    """SIGTERM (a scheduler's preemption or time-limit notice) -> checkpoint at the next step that
    every process agrees on, then return. Installed only when running in the main thread."""

    def __init__(self):
        self.flag = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.flag = True
        logging.warning("signal %d: saving a checkpoint at the next step, then stopping", signum)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (a collective in multi-process jobs)."""
        if jax.process_count() == 1:
            return self.flag
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))

    def close(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ------------------------------------------------------------------------------------------------
# Distributed set-up and the mesh.
# ------------------------------------------------------------------------------------------------
def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment says this is a multi-process job.

    Multi-process when any of: ``JAX_COORDINATOR_ADDRESS`` (``host:port``) is set (explicit: with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), ``ULD_DISTRIBUTED=1`` (let jax
    auto-detect: SLURM, Open MPI, TPU pods, GKE), ``SLURM_NTASKS`` > 1 (a ``srun`` step of several
    tasks), or a multi-worker TPU VM (``TPU_WORKER_HOSTNAMES`` lists several hosts);
    ``ULD_DISTRIBUTED=0`` forces a single process. Must run before any other jax call. Returns
    whether it initialised.
    """
    env = os.environ
    multi = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or env.get("ULD_DISTRIBUTED", "0") == "1"
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if env.get("ULD_DISTRIBUTED", "") == "0":
        multi = False
    if not multi:
        return False
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # jax reads the address itself, not the process count and id.
        kwargs = {"num_processes": int(env["JAX_NUM_PROCESSES"]),
                  "process_id": int(env["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def make_mesh(num_data_devices: int = -1) -> Mesh:
    """A 1-axis mesh ``('data',)`` over the first ``num_data_devices`` devices (-1: all of them)."""
    devices = jax.devices()
    n = len(devices) if num_data_devices in (-1, None) else int(num_data_devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"mesh.data={num_data_devices}: this job has {len(devices)} devices")
    if n != len(devices) and jax.process_count() > 1:
        raise ConfigError("mesh.data: a partial mesh is only supported in a single-process job")
    # Auto axes: the step is written for GSPMD propagation (jax.make_mesh defaults to Explicit);
    # make_mesh orders the devices for the physical topology (ICI/NVLink first).
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def to_global_batch(local_batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local numpy batch ``[B / process_count, ...]`` -> global arrays ``[B, ...]`` sharded
    on ``'data'``. Non-numeric entries (strings, objects) stay on the host and are dropped."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


# ------------------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------------------
def make_lr_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate: ``opt.lr`` times ``opt.decay_factor`` after each epoch in
    ``opt.decay_epochs`` (epoch counts from the start of this run), after an optional linear warmup
    of ``opt.warmup_steps`` steps from ``opt.lr * opt.warmup_init_factor``."""
    boundaries = {int(round(e * steps_per_epoch)): float(opt.decay_factor) for e in opt.decay_epochs}
    sched = optax.piecewise_constant_schedule(float(opt.lr), boundaries)
    if opt.warmup_steps > 0:
        warm = optax.linear_schedule(
            float(opt.lr) * float(opt.warmup_init_factor), float(opt.lr), int(opt.warmup_steps))
        sched = optax.join_schedules([warm, sched], [int(opt.warmup_steps)])
    return sched


def make_optimizer(
    opt: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Gradient clipping by global norm, optional decoupled weight decay, then RAdam/Adam/SGD."""
    sched = make_lr_schedule(opt, steps_per_epoch)
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    if opt.weight_decay > 0:
        parts.append(optax.add_decayed_weights(float(opt.weight_decay)))
    name = opt.name.lower()
    if name == "radam":
        parts.append(optax.radam(sched, b1=opt.b1, b2=opt.b2, eps=opt.eps))
    elif name == "adam":
        parts.append(optax.adam(sched, b1=opt.b1, b2=opt.b2, eps=opt.eps))
    elif name == "sgd":
        parts.append(optax.sgd(sched, momentum=opt.momentum or None))
    else:
        raise ConfigError(f"optimizer.name={opt.name!r}: expected radam, adam or sgd")
    return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------------
# Metrics: a clu Collection per set of metric names.
# ------------------------------------------------------------------------------------------------
_SEP = "__"


@functools.lru_cache(maxsize=None)
def collection_class(names: tuple[str, ...]) -> type[metrics.Collection]:
    """A ``clu.metrics.Collection`` of ``metrics.Average`` fields, one per metric name (``/`` in a
    name is stored as ``__`` since fields must be identifiers)."""
    for n in names:
        if _SEP in n:
            raise ValueError(f"metric name {n!r} must not contain {_SEP!r}")
    return metrics.Collection.create(**{n.replace("/", _SEP): metrics.Average for n in names})


def make_collection(values: Mapping[str, Any]) -> metrics.Collection:
    """Traceable: metric dict (scalars or ``(values, weights)`` pairs) -> a Collection instance."""
    fields = {}
    for name, v in values.items():
        if isinstance(v, (tuple, list)):
            vals, w = (jnp.asarray(a, jnp.float32) for a in v)
            fields[name] = metrics.Average(total=jnp.sum(vals * w), count=jnp.sum(w))
        else:
            fields[name] = metrics.Average(
                total=jnp.asarray(v, jnp.float32).reshape(()), count=jnp.ones((), jnp.float32))
    cls = collection_class(tuple(sorted(fields)))
    return cls.empty().replace(**{n.replace("/", _SEP): m for n, m in fields.items()})


@jax.jit
def _merge(a: metrics.Collection, b: metrics.Collection) -> metrics.Collection:
    return a.merge(b)


def compute_collection(coll: metrics.Collection) -> dict[str, float]:
    """Host side: name -> mean, skipping metrics whose weights summed to 0 in the interval."""
    coll = jax.device_get(coll)
    out = {}
    for field in dataclasses.fields(coll):
        if field.name == "_reduction_counter":
            continue
        m = getattr(coll, field.name)
        if float(m.count) > 0:
            out[field.name.replace(_SEP, "/")] = float(m.total) / float(m.count)
    return out


# ------------------------------------------------------------------------------------------------
# State, steps.
# ------------------------------------------------------------------------------------------------
def split_variables(variables: Mapping[str, Any]) -> tuple[PyTree, dict[str, Any]]:
    variables = dict(flax.core.unfreeze(variables))
    params = variables.pop("params")
    return params, variables


def init_state(task: Task, tx: optax.GradientTransformation, batch: Batch,
               rng: jax.Array | int, repl: NamedSharding) -> dict[str, Any]:
    """The train state ``{step, params, other, opt_state}``, created replicated on the mesh.

    ``rng``: a key, or an int seed (then the key is made inside the jitted function, which is what
    a multi-process job needs: no process-local array enters it)."""

    def _init(rng, batch):
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        params, other = split_variables(task.init(rng, batch))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
                "opt_state": tx.init(params)}

    if isinstance(rng, int):
        return jax.jit(functools.partial(_init, rng), out_shardings=repl)(batch)
    return jax.jit(_init, out_shardings=repl)(rng, batch)


def replicated_key(seed: int, repl: NamedSharding, fold: int = 0) -> jax.Array:
    """``fold_in(key(seed), fold)`` as a global array replicated on the mesh (multi-process safe)."""
    return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), fold), out_shardings=repl)()


def _put_replicated(x: np.ndarray, repl: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, repl, lambda idx: x[idx])


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics Collection, loss)``, jitted over ``mesh``
    with the batch sharded on ``'data'``, everything else replicated, and ``state`` donated."""
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))

    def train_step(state, batch, rng):
        step = state["step"]
        rng = jax.random.fold_in(rng, step)

        def loss_of(params):
            return task.loss_fn(params, state["other"], batch, rng, True)

        (loss, (new_other, task_metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"])
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state as it was: the host stops at its next check, and
        # nothing non-finite can reach a checkpoint even between checks.
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        new_state = {
            "step": step + 1,
            "params": jax.tree.map(keep, new_params, state["params"]),
            "other": jax.tree.map(keep, new_other, state["other"]),
            "opt_state": jax.tree.map(keep, new_opt, state["opt_state"]),
        }
        m = dict(task_metrics)
        m.update({
            "loss": loss,
            "norm/grad": grad_norm,
            "norm/param": optax.tree.norm(new_state["params"]),
            "norm/update": optax.tree.norm(updates),
            "lr": schedule(step),
            "nonfinite_steps": 1.0 - ok.astype(jnp.float32),
        })
        # The third output is what the host checks: NaN also when only the gradient is non-finite.
        return new_state, make_collection(m), jnp.where(ok, loss, jnp.nan)

    return jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl, repl),
                   donate_argnums=(0,))


def make_eval_step(task: Task, mesh: Mesh, seed: int = 0) -> Callable:
    """``eval_step(params, other, batch) -> metrics Collection``, jitted over ``mesh``."""
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))

    def eval_step(params, other, batch):
        if task.eval_fn is not None:
            m = task.eval_fn(params, other, batch)
        else:
            loss, (_, m) = task.loss_fn(params, other, batch, jax.random.key(seed), False)
            m = dict(m, loss=loss)
        return make_collection(m)

    return jax.jit(eval_step, in_shardings=(repl, repl, data), out_shardings=repl)


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------
class IteratorStateHandler(ocp.CheckpointHandler):
    """Orbax handler for a data iterator's ``get_state()`` dict, one JSON file per process
    (``process_<i>-of-<n>.json``), since every process reads its own shard of the data."""

    def save(self, directory: epath.Path, args: "IteratorStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "IteratorStateRestore" = None):
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a job with a different number "
                "of processes; resume with the same process count")
        return json.loads(path.read_text(encoding="utf-8"))

    def structure(self, directory):  # required by the interface
        return None


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


def make_checkpoint_manager(workdir: str, ckpt: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> ocp.CheckpointManager:
    """``workdir/checkpoints`` with items ``state``, ``data_iter`` and ``config``; keeps the last
    ``ckpt.keep`` checkpoints, plus every epoch-end one when ``ckpt.keep_epochs`` (finetuning starts
    from the epoch-4 checkpoint of a MELD run)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt.keep),
        keep_period=int(steps_per_epoch) if ckpt.keep_epochs else None,
        create=True,
        enable_async_checkpointing=bool(ckpt.async_save),
        cleanup_tmp_directories=True,  # a save cut short by a kill leaves a *.orbax-checkpoint-tmp
    )
    return ocp.CheckpointManager(
        epath.Path(workdir) / "checkpoints", options=options,
        item_names=("state", "data_iter", "config"))


def _reader(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        epath.Path(workdir) / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": IteratorStateHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of a run's finished checkpoints, in order (empty when it saved none)."""
    mngr = _reader(workdir)
    steps = sorted(int(s) for s in mngr.all_steps())
    mngr.close()
    return steps


def load_checkpoint_state(workdir: str, step: Optional[int] = None) -> tuple[int, dict[str, Any]]:
    """``(step, state)`` of a run's checkpoint (latest when ``step`` is None) as numpy arrays:
    ``state = {step, params, other, opt_state}``. For finetuning, mining and evaluation."""
    mngr = _reader(workdir)
    step = mngr.latest_step() if step is None else int(step)
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint {'' if step is None else step} in {workdir}/checkpoints "
            f"(available: {sorted(mngr.all_steps())})")
    # Restore onto this process's first device whatever the saving job's topology was.
    meta = mngr.item_metadata(step).state
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return step, jax.tree.map(np.asarray, restored.state)


def load_checkpoint_config(workdir: str, step: Optional[int] = None) -> dict[str, Any]:
    """The config (as saved, a JSON dict, with a ``_derived`` entry) of a run's checkpoint."""
    mngr = _reader(workdir)
    step = mngr.latest_step() if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    mngr.close()
    return cfg


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _init_from(state: dict[str, Any], init: ml_collections.ConfigDict,
               repl: NamedSharding) -> dict[str, Any]:
    """Finetuning: params and other variables from another run's checkpoint, a fresh optimizer."""
    step = int(init.step)
    if step < 0 and init.epoch > 0:
        src = load_checkpoint_config(init.workdir)
        step = int(init.epoch) * int(src["_derived"]["steps_per_epoch"])
    step, src_state = load_checkpoint_state(init.workdir, None if step < 0 else step)
    out = dict(state)
    for key in ("params", "other"):
        want = jax.tree.structure(state[key])
        got = jax.tree.structure(jax.tree.map(np.asarray, src_state[key]))
        if want != got:
            raise ConfigError(f"init_from {init.workdir} step {step}: its {key} do not match this "
                             f"model's\n  this: {want}\n  there: {got}")
        out[key] = jax.tree.map(
            lambda a, b: _put_replicated(np.asarray(b, dtype=a.dtype), repl), state[key],
            src_state[key])
    logging.info("initialised params from %s step %d", init.workdir, step)
    return out


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------
def _config_json(config: ml_collections.ConfigDict, derived: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(config.to_json_best_effort())
    d["_derived"] = derived
    return d


class _FiniteGuard:
    """Keeps each step's loss (device scalars) until the next check, to name the first bad step."""

    def __init__(self, workdir: str):
        self.pending: list[tuple[int, jax.Array]] = []
        self.workdir = workdir
        self.last_saved: Optional[int] = None

    def add(self, step: int, loss: jax.Array):
        self.pending.append((step, loss))

    def check(self):
        if not self.pending:
            return
        losses = jax.device_get([l for _, l in self.pending])
        for (step, _), loss in zip(self.pending, losses):
            if not np.isfinite(loss):
                saved = (f"the last good checkpoint is step {self.last_saved} in "
                         f"{self.workdir}/checkpoints; a rerun resumes from it"
                         if self.last_saved is not None else "no checkpoint was written")
                raise NonFiniteLossError(
                    f"training stopped: non-finite loss ({loss}) or gradient at step {step}; {saved}. "
                    "Lower optimizer.lr or optimizer.grad_clip_norm, or check that step's batch.")
        self.pending.clear()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: Optional[Task] = None, data: Optional[Data] = None) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when it has checkpoints) and evaluates periodically.

    ``task``/``data`` default to ``uld_jax.tasks.build_task/build_data(config)``. Returns a summary:
    ``{"step", "train": last train metrics, "eval": last eval metrics, "state": final state,
    "stopped": True if a SIGTERM ended it early (after saving a checkpoint)}``.
    Raises :class:`NonFiniteLossError` on a NaN/Inf loss (checkpoints up to the last good one kept).
    """
    if task is None or data is None:
        from uld_jax import tasks as tasks_lib  # late: keeps this module free of model imports
        task = task or tasks_lib.build_task(config)
        data = data or tasks_lib.build_data(config)
    workdir = os.fspath(workdir)
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    resuming = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if (config.init_from.epoch > 0 or config.init_from.step >= 0) and not (
            config.init_from.workdir or resuming):
        raise ConfigError("this config starts from another run's checkpoint (init_from.epoch/step "
                         "is set): pass --config.init_from.workdir=<that run's workdir>")
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    pidx, pcount = jax.process_index(), jax.process_count()

    mesh = make_mesh(config.mesh.data)
    repl, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    gbs = int(config.batch_size)
    if gbs % mesh.size or gbs % pcount:
        raise ConfigError(
            f"batch_size={gbs} (global) must be divisible by the {mesh.size} devices of the mesh "
            f"and the {pcount} processes; set --config.batch_size to a multiple of {mesh.size}")
    spe = int(config.steps_per_epoch) if config.steps_per_epoch > 0 else int(data.steps_per_epoch)
    if spe < 1:
        raise ConfigError(
            f"an epoch of the training data holds no full global batch of {gbs} samples (0 steps "
            "per epoch): use a larger training split, a smaller --config.batch_size, or set "
            "--config.steps_per_epoch")
    total = int(config.total_steps) if config.total_steps > 0 else int(config.num_epochs) * spe
    log_every = max(1, int(config.log_every_steps))
    ckpt_every = int(config.checkpoint.every_steps) if config.checkpoint.every_steps > 0 else spe
    eval_every = int(config.eval_every_steps) if config.eval_every_steps > 0 else spe
    derived = {"steps_per_epoch": spe, "total_steps": total, "mesh_devices": mesh.size,
               "process_count": pcount}
    logging.info("training %d steps (%d per epoch), global batch %d on %d devices (%d processes)",
                 total, spe, gbs, mesh.size, pcount)

    tx, schedule = make_optimizer(config.optimizer, spe)
    train_it = data.train_iter(pidx, pcount)
    start_it_state = train_it.get_state()
    example = to_global_batch(next(train_it), batch_sharding)
    train_it.set_state(start_it_state)

    # Parameters from key(seed); the step rng is fold_in(fold_in(key(seed), 1), step).
    state = init_state(task, tx, example, int(config.seed), repl)
    del example
    train_rng = replicated_key(int(config.seed), repl, fold=1)

    mngr = make_checkpoint_manager(workdir, config.checkpoint, spe)
    guard = _FiniteGuard(workdir)
    latest = mngr.latest_step()
    if latest is not None:
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)),
            data_iter=IteratorStateRestore(),
            config=ocp.args.JsonRestore()))
        state = restored.state
        train_it.set_state(restored.data_iter)
        guard.last_saved = latest
        _log_config_changes(restored.config, _config_json(config, derived))
        logging.info("resumed from %s/checkpoints step %d", workdir, latest)
    elif config.init_from.workdir:
        state = _init_from(state, config.init_from, repl)

    train_step = make_train_step(task, tx, schedule, mesh)
    eval_step = make_eval_step(task, mesh, int(config.seed))

    writer = metric_writers.create_default_writer(workdir, just_logging=pidx > 0)
    step = int(jax.device_get(state["step"]))
    if step == 0:
        writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=log_every, every_secs=None)

    def save(step: int):
        guard.check()
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=IteratorStateSave(train_it.get_state()),
            config=ocp.args.JsonSave(_config_json(config, derived))))
        guard.last_saved = step

    def evaluate(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if data.eval_iter is not None:
            coll = None
            for local in data.eval_iter(pidx, pcount):
                c = eval_step(state["params"], state["other"], to_global_batch(local, batch_sharding))
                coll = c if coll is None else _merge(coll, c)
            if coll is not None:
                out.update(compute_collection(coll))
        if task.extra_eval is not None:
            out.update(task.extra_eval(step, {"params": state["params"], **state["other"]}))
        if out:
            writer.write_scalars(step, {f"val/{k}": v for k, v in out.items()})
        return out

    train_metrics = None
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    t_interval, data_wait, steps_in_interval = time.perf_counter(), 0.0, 0
    sleep_s = float(config.debug.sleep_per_step_s)
    stop = _StopRequest()
    stopped = False
    try:
        while step < total:
            t0 = time.perf_counter()
            local = next(train_it)
            data_wait += time.perf_counter() - t0
            state, m, loss = train_step(state, to_global_batch(local, batch_sharding), train_rng)
            step += 1
            steps_in_interval += 1
            guard.add(step, loss)
            train_metrics = m if train_metrics is None else _merge(train_metrics, m)
            report(step)
            if sleep_s:
                time.sleep(sleep_s)
            if step % log_every == 0 or step == total:
                jax.block_until_ready(loss)
                dt = time.perf_counter() - t_interval
                guard.check()
                last_train = compute_collection(train_metrics)
                last_train.pop("nonfinite_steps", None)
                scalars = {f"train/{k}": v for k, v in last_train.items()}
                scalars.update({
                    "throughput/steps_per_sec": steps_in_interval / dt,
                    "throughput/samples_per_sec": steps_in_interval * gbs / dt,
                    "throughput/data_wait_fraction": data_wait / dt,
                    "epoch": step / spe,
                })
                writer.write_scalars(step, scalars)
                train_metrics, t_interval, data_wait, steps_in_interval = (
                    None, time.perf_counter(), 0.0, 0)
            if step % eval_every == 0 or step == total:
                guard.check()
                with report.timed("eval"):
                    last_eval = evaluate(step)
            if step % ckpt_every == 0 or step % spe == 0 or step == total:
                save(step)
            # Multi-process jobs agree at log steps (a collective); one process checks every step.
            if (pcount == 1 or step % log_every == 0) and step < total and stop.agreed():
                if guard.last_saved != step:
                    save(step)
                logging.warning("stopped on SIGTERM at step %d; checkpoint saved in %s/checkpoints, "
                                "rerun to resume", step, workdir)
                stopped = True
                break
        guard.check()
    finally:
        stop.close()
        mngr.wait_until_finished()
        writer.flush()
    mngr.close()
    writer.close()
    return {"step": step, "train": last_train, "eval": last_eval, "state": state,
            "stopped": stopped}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _log_config_changes(saved: dict[str, Any], now: dict[str, Any]):
    a, b = _flat(saved), _flat(json.loads(json.dumps(now)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        logging.warning("resuming with a config that differs from the checkpoint's in: %s",
                        ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff))

