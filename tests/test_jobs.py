"""The job book (serving/jobs.py) without Ray: states, positions, owners, events in order, cancellation, expiry."""

from __future__ import annotations

import asyncio

import pytest

from serving.jobs import ANONYMOUS, JobBook, owner_of


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_jobs_move_through_their_states_and_queue_positions_count_across_owners():
    async def scenario():
        clock = Clock()
        book = JobBook(ttl_s=60, lost_after_s=30, clock=clock)
        first = book.create("alice")
        clock.now += 1
        second = book.create("bob")
        assert (first["state"], first["position"], second["position"]) == ("queued", 1, 2)
        book.record(first["id"], "started", {})
        assert book.get(second["id"], "bob")["position"] == 1  # the first left the queue
        book.record(first["id"], "step", {"step": 3, "steps": 10, "stage": "fusion"})
        running = book.get(first["id"], "alice")
        assert running["state"] == "running" and running["progress"] == {"step": 3, "steps": 10, "stage": "fusion"}
        assert "position" not in running
        book.record(first["id"], "succeeded", {"images": ["x"]})
        done = book.get(first["id"], "alice")
        assert done["state"] == "succeeded" and done["result"] == {"images": ["x"]} and "progress" not in done
        assert not book.record(first["id"], "step", {"step": 4})  # a finished job takes no more events
        book.record(second["id"], "failed", {"error": "internal", "message": "m", "error_id": "e1"})
        assert book.get(second["id"], "bob")["error"]["error_id"] == "e1"
        with pytest.raises(ValueError, match="unknown job event 'nonsense'"):
            book.record(book.create("carol")["id"], "nonsense", {})
        assert book.counts()["succeeded"] == 1 and book.counts()["failed"] == 1

    asyncio.run(scenario())


def test_another_owner_sees_nothing_and_tokens_are_never_stored():
    async def scenario():
        book = JobBook()
        job = book.create(owner_of("token-a"))
        assert book.get(job["id"], owner_of("token-b")) is None
        assert book.cancel(job["id"], owner_of("token-b")) is None
        assert await book.wait_events(job["id"], owner_of("token-b"), 0, 0.1) is None
        assert book.get(job["id"], owner_of("token-a"))["state"] == "queued"
        assert owner_of(None) == ANONYMOUS and "token-a" not in owner_of("token-a")

    asyncio.run(scenario())


def test_events_stream_in_order_resume_after_a_sequence_number_and_keep_only_the_newest_preview():
    async def scenario():
        book = JobBook()
        job = book.create("o")
        waiter = asyncio.create_task(book.wait_events(job["id"], "o", 1, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # nothing new yet: the long poll waits
        book.record(job["id"], "step", {"step": 1, "steps": 4, "stage": "scene"})
        fresh = await asyncio.wait_for(waiter, 1)
        assert [(e["seq"], e["event"]) for e in fresh] == [(2, "step")]
        book.record(job["id"], "preview", {"step": 2, "images": ["a"]})
        book.record(job["id"], "preview", {"step": 4, "images": ["b"]})
        events = await book.wait_events(job["id"], "o", 0, timeout_s=0)
        assert [e["event"] for e in events] == ["queued", "step", "preview", "preview"]
        assert events[2]["data"] == {"step": 2, "superseded": True} and events[3]["data"]["images"] == ["b"]
        assert await book.wait_events(job["id"], "o", 4, timeout_s=0.05) == []  # timeout: nothing new

    asyncio.run(scenario())


def test_cancel_wakes_the_runner_and_ends_the_stream():
    async def scenario():
        book = JobBook()
        job = book.create("o")
        runner = asyncio.create_task(book.wait_cancel(job["id"]))
        stream = asyncio.create_task(book.wait_events(job["id"], "o", 1, timeout_s=5))
        await asyncio.sleep(0.05)
        assert book.cancel(job["id"], "o")["state"] == "cancelled"
        assert await asyncio.wait_for(runner, 1) is True
        assert [e["event"] for e in await asyncio.wait_for(stream, 1)] == ["cancelled"]
        assert book.cancel(job["id"], "o")["state"] == "cancelled"  # again: no change, no error
        assert await book.wait_cancel("unknown") is False

    asyncio.run(scenario())


def test_finished_jobs_expire_after_the_ttl_and_silent_runners_fail_as_lost():
    async def scenario():
        clock = Clock()
        book = JobBook(ttl_s=60, lost_after_s=30, clock=clock)
        done, quiet = book.create("o"), book.create("o")
        book.record(done["id"], "succeeded", {})
        clock.now += 31
        assert book.get(quiet["id"], "o")["error"]["error"] == "lost"
        assert book.get(done["id"], "o")["state"] == "succeeded"
        clock.now += 30
        assert book.get(done["id"], "o") is None  # 61 s after it finished
        assert book.get(quiet["id"], "o") is not None  # failed 30 s ago: kept until its own TTL

    asyncio.run(scenario())
