"""The near-duplicate filter across a whole preprocessing run: one small named Ray actor per run holds the run's
`facediffuser.data.dedup.HashIndex`, and every pool worker's `dedup` stage asks it "seen this hash (within d bits)?".
A per-block index would miss a duplicate in another block, and blocks run on different workers and nodes.

The actor asks for no CPU (the stage pools hold the cluster's CPUs) and is pinned to the driver's node: the job
already ends with the driver, and a worker node that dies must not take the index with it. A resumed run's index
starts from the hashes in the shard files already written (`dedup.written_hashes`), so a duplicate of a row
written before the stop is still rejected.
"""

from __future__ import annotations

from facediffuser.data.dedup import HashIndex


class SeenHashes:
    """The actor: the run's index of kept photos' hashes."""

    def __init__(self, distance: int, written: dict[str, int]):
        self.index = HashIndex(distance)
        for item_id, value in sorted(written.items()):
            self.index.add(item_id, value)

    def check(self, item_id: str, value: int) -> tuple[str, int] | None:
        return self.index.check_and_add(item_id, value)

    def size(self) -> int:
        return len(self.index)


class AskSeenHashes:
    """What a pool worker calls as the `dedup` stage's `seen(id, hash)`: one call to the run's actor (picklable:
    it travels to the workers inside the pools' arguments)."""

    def __init__(self, actor):
        self.actor = actor

    def __call__(self, item_id: str, value: int) -> tuple[str, int] | None:
        import ray

        found = ray.get(self.actor.check.remote(item_id, value))
        return None if found is None else (found[0], int(found[1]))


def start_index(run: str, distance: int, written: dict[str, int]):
    """The run's actor (named `preprocess-dedup-RUN` in the job's namespace), seeded with `written` ({id: hash}
    of rows already in the shards), on this (the driver's) node. → its handle; `stop_index` ends it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_class = ray.remote(num_cpus=0, max_restarts=0)(SeenHashes)
    here = ray.get_runtime_context().get_node_id()
    actor = actor_class.options(
        name=f"preprocess-dedup-{run}",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(distance, written)
    ray.get(actor.size.remote())  # started (and seeded) before the first block asks
    return actor


def stop_index(actor) -> None:
    import ray

    ray.kill(actor, no_restart=True)
