"""What the tasks share: which failures to retry, and caches that trust what is on disk.

A training task is retried after a crash (the retry resumes from `last.pt`), never after a bad
setting. It is cached under a key of everything that determines its weights, offered only while
the finished checkpoint is on disk, so a pipeline re-run with unchanged settings skips training
and a deleted checkpoint is trained again. `OutputCache` serves every task whose output lives
outside Prefect the same way: cases in the store, latents, the scale factor, evaluation reports,
inferred volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from ctdiff.fingerprint import settings_digest
from ctdiff.errors import WeightsMismatch
from ctdiff.store import write_refusal


def is_transient(task, task_run, state) -> bool:
    """Retry I/O failures (network filesystems, evicted volumes); bad data is quarantined. A
    read-only, full or forbidden filesystem stays so on a retry: that fails at once."""
    try:
        state.result()
    except OSError as error:
        return write_refusal(error) is None
    except Exception:  # noqa: BLE001 - anything else is not worth retrying
        return False
    return False


def retry_training(task, task_run, state) -> bool:
    """Retry crashes (lost GPU, OOM kill, I/O); a bad setting, or a read-only, full or forbidden
    filesystem, fails the same way every time."""
    try:
        state.result()
    except (ValueError, WeightsMismatch):
        return False
    except OSError as error:
        return write_refusal(error) is None
    except Exception:  # noqa: BLE001 - anything else may pass on a second try, which resumes
        return True
    return False


def finished_checkpoint(path: Path, steps: int) -> bool:
    """True when `path` holds a checkpoint that reached `steps` (memory-mapped: weights stay on disk)."""
    if not path.is_file():
        return False
    import torch  # only where a checkpoint is read: preprocessing never imports torch

    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(payload.get("step", -1)) >= steps


@dataclass
class OutputCache(CachePolicy):
    """Key = `key_fn(inputs)`: what determines the output (settings, data identity, code); None
    when there is nothing to key on yet (the task runs, uncached).

    Offered while `done_fn(inputs, key)` finds that output on disk (a finished checkpoint, a case
    in the store, a recorded scale factor), or while nothing is recorded under the key yet (a
    first run, whose result is then cached). A recorded result whose output is gone (deleted, or
    killed before its rename) is stale: the key is withheld and the task runs again.
    """

    key_fn: Callable[[dict[str, Any]], str | None] | None = None
    done_fn: Callable[[dict[str, Any], str], bool] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        assert self.key_fn is not None and self.done_fn is not None
        key = self.key_fn(inputs)
        if key is None or self.done_fn(inputs, key):
            return key
        return None if task_ctx.result_store.exists(key) else key


@dataclass
class KeyedCache(CachePolicy):
    """Key = `key_fn(inputs)`, for steps whose output is fixed by what the key reads (None: run)."""

    key_fn: Callable[[dict[str, Any]], str | None] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        assert self.key_fn is not None
        return self.key_fn(inputs)


def file_state_key(kind: str, path: Path) -> str | None:
    """A key that changes whenever the file at `path` is rewritten (size and modification time)."""
    if not path.is_file():
        return None
    stat = path.stat()
    return settings_digest(kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def training_key(kind: str, sections: dict[str, Any], data: Any, code: str) -> str:
    return settings_digest(f"train-{kind}", sections, data, code)


def training_task(name: str, key_fn: Callable[[dict[str, Any]], str], done_fn: Callable[[dict[str, Any], str], bool]):
    """The decorator of a training task: cached under `key_fn` while `done_fn` finds the finished
    checkpoint, and retried after crashes (each retry resumes from `last.pt`)."""
    return task(
        name=name,
        cache_policy=OutputCache(key_fn=key_fn, done_fn=done_fn),
        retries=2,
        retry_delay_seconds=10,
        retry_condition_fn=retry_training,
        persist_result=True,
    )
