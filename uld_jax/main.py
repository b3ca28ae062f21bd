"""Command line entry point of training.

    python -m uld_jax.main --config configs/meld.py:tiny --workdir DIR [--config.KEY=VALUE ...]

``--config`` is a Python config file with an optional variant after ``:`` (``tiny`` | ``paper``);
``--config.KEY=VALUE`` overrides one existing key (the config is locked: a key that does not exist
is an error naming it). Rerunning on the same ``--workdir`` resumes from its latest checkpoint.
Multi-process jobs (SLURM, TPU pods, explicit JAX_COORDINATOR_ADDRESS) are detected from the
environment, see ``uld_jax.train.maybe_initialize_distributed`` and docs/scaling.md.
"""

from __future__ import annotations

import logging as pylogging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Exit codes: 0 done, 2 bad command line, 3 non-finite loss, 75 (EX_TEMPFAIL) stopped by SIGTERM
# after a checkpoint (requeue / rerun to resume).
EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file[:variant], e.g. configs/meld.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops INFO lines of orbax / tensorstore / grain internals (dozens per checkpoint); run with
    ``-v 1`` to see them."""

    NOISY = ("/orbax/", "/tensorstore/", "/grain/", "/etils/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            n in record.pathname for n in self.NOISY)


def main(argv):
    del argv
    if flags.FLAGS.verbosity < 1:
        logging.get_absl_handler().addFilter(_QuietLibraries())
    from uld_jax import train  # after flag parsing, so a config error never pays for jax's import

    train.maybe_initialize_distributed()
    import jax

    logging.info("jax %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    if jax.config.jax_compilation_cache_dir:
        logging.info("persistent compilation cache: %s", jax.config.jax_compilation_cache_dir)
    from uld_jax import tasks

    try:
        out = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (train.ConfigError, tasks.TaskUnavailableError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteLossError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if out["stopped"]:
        print(f"stopped on SIGTERM at step {out['step']} (checkpoint saved); rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def _one_line_flag_errors(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag (above all an unknown ``--config.*`` key) exits with one line."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        # ml_collections raises these for a key the locked config does not have; name the flag.
        text = str(e.args[0] if e.args else e)
        m = re.search(r"(\w+)", text)
        name = m.group(1) if m else text
        hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
        flag = next((a.split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and name in a.split("=")[0].split(".")), name)
        print(f"error: unknown config key {flag.lstrip('-')!r}"
              f"{' (' + hint.group(0) + ')' if hint else ''}", file=sys.stderr)
    except flags.Error as e:
        msg = " ".join(str(e).split())
        # A config file that raised: keep the flag and the exception's last line only.
        last = re.findall(r"(\w+Error: .*?)(?= File \"|$)", msg)
        if "Traceback" in msg and last:
            msg = f"{msg.split(':', 1)[0]}: {last[-1]}"
        print(f"error: bad command-line flag: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_one_line_flag_errors)
