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
                await bus.publish("balance:a1")
            await asyncio.sleep(rounds.random() * 0.005)
            tasks = list(bus._tasks)
            for task in tasks:
                task.cancel()
            _, running = await asyncio.wait(tasks, timeout=5)
            assert not running, f"still running after a cancel: {[task.get_name() for task in running]}"
            await bus.close()
    finally:
        delete_redis_keys(prefix)
