"""The task that identifies a checkpoint by its weights, shared by `evaluate` and `infer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from ctdiff.checkpoint import checkpoint_digest
from tasks.training import KeyedCache, file_state_key


def _checkpoint_key(inputs: dict[str, Any]) -> str | None:
    return file_state_key("diffusion-checkpoint", Path(inputs["path"]))


@task(name="checkpoint-digest", cache_policy=KeyedCache(key_fn=_checkpoint_key), persist_result=True)
def digest_checkpoint(path: str) -> dict:
    """{path, digest}: the content hash keys evaluations and inferences, so a rewritten file is
    used again under a new key."""
    if not Path(path).is_file():
        raise ValueError(f"no such checkpoint: {path}")
    return {"path": path, "digest": checkpoint_digest(path)}
