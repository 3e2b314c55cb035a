"""The Redis bus: its background tasks end when they are cancelled, whenever that happens."""

from __future__ import annotations

import asyncio
import random

from creditd.store.redis_bus import RedisBus
from tests.services import REDIS_URL, delete_redis_keys, new_redis_prefix


async def test_the_bus_tasks_end_when_cancelled_at_any_moment() -> None:
    """A cancel that lands while redis-py completes a command (Python 3.11's wait_for drops
    it then) must still end the task: asyncio.run cancels each task once at exit, and a task
    that goes on holds the process forever."""
    prefix = new_redis_prefix()
    rounds = random.Random(12)
    try:
        for _ in range(100):
            bus = RedisBus(REDIS_URL, prefix)
            await bus.start()
            for _ in range(rounds.randint(1, 5)):
                await bus.publish("config:a1")
            await asyncio.sleep(rounds.random() * 0.005)
            tasks = list(bus._tasks)
            for task in tasks:
                task.cancel()
            _, running = await asyncio.wait(tasks, timeout=5)
            assert not running, f"still running after a cancel: {[task.get_name() for task in running]}"
            await bus.close()
    finally:
        delete_redis_keys(prefix)


async def test_a_balance_change_is_published_only_while_some_replica_watches_it() -> None:
    prefix = new_redis_prefix()
    sender, receiver = RedisBus(REDIS_URL, prefix), RedisBus(REDIS_URL, prefix)
    await sender.start()
    await receiver.start()
    try:
        async with receiver.subscribe(lambda c: c.startswith(("balance:", "config:"))) as queue:
            sender.notify("balance:a1")  # nobody watches a1: nothing is sent
            sender.notify("config:a1")  # other notifications always are
            assert await asyncio.wait_for(queue.get(), 5) == "config:a1"
            assert sender.watched("a1") is False
            async with receiver.watch("a1"):
                deadline = asyncio.get_running_loop().time() + 5
                while not sender.watched("a1"):  # the announcement reaches the other replica
                    assert asyncio.get_running_loop().time() < deadline, "the watch was never announced"
                    await asyncio.sleep(0.01)
                sender.notify("balance:a1")
                assert await asyncio.wait_for(queue.get(), 5) == "balance:a1"
            assert queue.empty()
    finally:
        await sender.close()
        await receiver.close()
        delete_redis_keys(prefix)
