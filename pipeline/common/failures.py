"""Which failures of a Ray Train run a restart can fix, and ending the run at once on the others.

Ray Train V2 restarts the worker group for every worker error, up to `FailureConfig(max_failures)` times: right
for a lost node or a killed worker, pointless for an error that comes from the params, the data or the disk,
which the restarted group meets again (each restart costing a worker-group start and the updates since the
checkpoint). Ray has no non-retryable worker error, so:

- the worker turns such errors into `RunCannotContinue`, its message naming the key or the path to fix
  (`cannot_continue`, `storage_errors`);
- `FailFast`, a Ray Train `UserCallback` that runs in the controller, sees the worker's exception when the
  controller polls the group and raises it there. The controller treats an error in its own loop as a
  non-retryable `ControllerError`: the run ends without a restart, and `trainer.fit()` raises it;
- the driver unwraps it (`reason`) so the stage ends with the worker's message, not Ray's.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from ray.train import ControllerError, UserCallback

from transformer.corpus import CorpusError
from transformer.training import NonFiniteTraining

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class RunCannotContinue(RuntimeError):
    """An error a restart from the checkpoint would meet again: the run ends at once, without a retry."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or a full quota, from Python or from pyarrow (which sets errno and says it in the message)."""
    return isinstance(e, OSError) and (e.errno in DISK_FULL or "No space left on device" in str(e))


@contextmanager
def storage_errors(what: str, path: str) -> Iterator[None]:
    """Turn a full disk while writing `what` to `path` into RunCannotContinue naming both."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise RunCannotContinue(
            f"no space left on device while writing {what} to {path} (train.storage_path): free space there, "
            f"or lower train.keep_checkpoints; not retried. ({e})"
        ) from e


def cannot_continue(e: BaseException, training: dict) -> RunCannotContinue | None:
    """The RunCannotContinue for a worker's error that a restart cannot fix, else None (retry it).
    `training`: the TrainingConfig values the worker runs with, to name the keys that set them."""
    if isinstance(e, RunCannotContinue):
        return e
    if isinstance(e, NonFiniteTraining):
        keys = ", ".join(f"train.{k}: {training.get(k)}" for k in ("lr_factor", "warmup", "clip_norm"))
        return RunCannotContinue(
            f"{e}. Not retried: a restart from the checkpoint replays the same updates. In params.yaml: {keys}"
        )
    if isinstance(e, CorpusError):
        return RunCannotContinue(f"{e}. Not retried: the data is at fault (rerun the binarise stage)")
    if is_disk_full(e):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return RunCannotContinue(f"no space left on device{where}: {e}; not retried")
    return None


def worker_error(exception: BaseException) -> BaseException:
    """The exception the training function raised, from Ray's wrapper of it (which keeps it, with the worker's
    traceback as text, in `_base_exc`); other errors (a dead actor, a failed health check) as they are."""
    return getattr(exception, "_base_exc", exception)


class FailFast(UserCallback):
    """In the controller: end the run when a worker raised RunCannotContinue, instead of restarting the group."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, exception in sorted(worker_exceptions.items()):
            error = worker_error(exception)
            if isinstance(error, RunCannotContinue):
                raise RunCannotContinue(f"worker {rank}: {error}") from None


def reason(error: Exception) -> Exception:
    """What to tell the user when `trainer.fit()` raised `error`: the RunCannotContinue inside it, if any."""
    if isinstance(error, ControllerError) and isinstance(error.controller_failure, RunCannotContinue):
        return error.controller_failure
    return error
