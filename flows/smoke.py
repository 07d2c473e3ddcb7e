"""A tiny flow for checking a deployment end to end (server -> work pool -> worker -> run): it writes
one JSON artifact through the same store and task machinery as the real pipeline."""

from __future__ import annotations

from prefect import flow, task

from tasks.store import open_store


@task(name="smoke-write", tags={"gpu"})
def write(store: str | None, n: int) -> dict:
    return open_store(store).put_json({"n": n, "squares": [i * i for i in range(n)]}, "smoke.json", "smoke", "smoke")


@flow(name="smoke")
def smoke(n: int = 3, store: str | None = None) -> dict:
    man = write(store, n)
    assert open_store(store).read_json(man)["squares"][-1] == (n - 1) ** 2
    return man
