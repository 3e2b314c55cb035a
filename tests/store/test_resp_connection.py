"""The multiplexed Redis connection of the hot path (creditd.store.resp) on the machine's Redis:
every caller gets the reply to its own command, through lost connections and reconnects."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from creditd.errors import StoreUnavailable
from creditd.store.resp import RespConnection
from tests import services


async def _echoes(
    connection: RespConnection, name: str, stop: asyncio.Event, wrong: list[tuple[str, Any]], answers: list[str]
) -> int:
    """ECHO a token of its own again and again; notes every reply that is not its token."""
    answered = 0
    n = 0
    while not stop.is_set():
        token = f"{name}-{n}"
        n += 1
        try:
            reply = await connection.call(["ECHO", token])
        except StoreUnavailable:
            await asyncio.sleep(0)
            continue
        answered += 1
        answers.append(name)
        if reply != token:
            wrong.append((token, reply))
    return answered


async def test_a_failed_connect_and_callers_arriving_around_it_never_open_two_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection attempt fails (Redis restarting). Callers that arrive in the same turn of
    the loop start the next attempt before the first attempt's own waiters wake up; those
    must not forget the new attempt, or a third one opens a second connection at once, the
    commands sent on one are answered by the other's replies, and every caller from then on
    gets the reply of another command (a reserve the reply of a read, a top-up a session's)."""
    loop = asyncio.get_running_loop()
    original = loop.create_connection
    release = asyncio.Event()
    attempts: list[int] = []
    opened: list[int] = []

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            await release.wait()
            raise ConnectionRefusedError(111, "Connection refused (Redis is restarting)")
        made = await original(*args, **kwargs)
        opened.append(len(attempts))
        return made

    monkeypatch.setattr(loop, "create_connection", create_connection)
    connection = RespConnection(services.REDIS_URL)
    try:
        first = asyncio.create_task(connection.call(["ECHO", "first"]))  # waits for the first attempt
        while connection._connecting is None:  # noqa: ASYNC110 - the turn it starts connecting
            await asyncio.sleep(0)
        attempt = connection._connecting

        async def caller(name: str, after: asyncio.Future[Any]) -> int:
            while not after.done():  # noqa: ASYNC110 - then arrive at once, in the first turn of the loop after it
                await asyncio.sleep(0)
            return await _echoes(connection, name, stop, wrong, answers)

        stop = asyncio.Event()
        wrong: list[tuple[str, Any]] = []
        answers: list[str] = []
        # Some arrive as soon as the attempt has failed, before its waiter wakes; others
        # once that waiter has had its answer, while the next attempt is on its way.
        callers = [asyncio.create_task(caller(f"a{i}", attempt)) for i in range(10)]
        callers += [asyncio.create_task(caller(f"b{i}", first)) for i in range(10)]
        for _ in range(3):
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(StoreUnavailable):
            await first
        # Until every caller had many answers: both attempts have long connected by then.
        deadline = loop.time() + 10
        while min(Counter(answers).get(f"{g}{i}", 0) for g in "ab" for i in range(10)) < 50:
            assert loop.time() < deadline, Counter(answers)
            await asyncio.sleep(0.01)
        stop.set()
        answered = await asyncio.gather(*callers)
        assert len(attempts) >= 2 and opened, attempts
        assert not wrong, f"{len(wrong)} replies to another caller's command, e.g. {wrong[:3]}"
        assert len(opened) == 1, f"{len(opened)} connections open at once"
        assert sum(answered) > 0
    finally:
        connection.close()


async def test_replies_follow_their_commands_through_many_lost_connections() -> None:
    """Connections dropped under load (Redis closing them): what was in flight fails with
    StoreUnavailable, and every reply that comes is the reply to its caller's command."""
    connection = RespConnection(services.REDIS_URL)
    stop = asyncio.Event()
    wrong: list[tuple[str, Any]] = []
    answers: list[str] = []
    try:
        callers = [asyncio.create_task(_echoes(connection, f"c{i}", stop, wrong, answers)) for i in range(30)]
        deadline = asyncio.get_running_loop().time() + 10
        for drop in range(20):
            while len(answers) < 100 * (drop + 1):  # some traffic on each connection
                assert asyncio.get_running_loop().time() < deadline, len(answers)
                await asyncio.sleep(0.001)
            transport = connection.transport
            if transport is not None:
                transport.abort()  # as a restarting Redis does
        stop.set()
        answered = await asyncio.gather(*callers)
        assert sum(answered) > 0
        assert not wrong, wrong[:5]
        assert await connection.call(["ECHO", "last"]) == "last"
    finally:
        connection.close()


BUSY_SCRIPT = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= tonumber(ARGV[1])
return 'done'
"""


async def test_commands_queued_while_a_write_is_unanswered_go_together_after_its_reply() -> None:
    """One write in flight at a time: what callers queue in the following turns of the loop,
    while Redis is still busy with the first write, is written at once when its reply comes,
    and every caller gets its own reply; an idle connection writes at once."""
    connection = RespConnection(services.REDIS_URL)
    try:
        assert await connection.call(["ECHO", "warm"]) == "warm"
        writes = connection.writes
        busy = asyncio.create_task(connection.call(["EVAL", BUSY_SCRIPT, 0, 1_000_000]))  # 1 s in Redis
        await asyncio.sleep(0)  # the script is written at the end of this turn
        echoes = []
        for n in range(20):  # one caller a turn, all while the script runs
            echoes.append(asyncio.create_task(connection.call(["ECHO", f"e{n}"])))
            await asyncio.sleep(0)
        assert not busy.done()
        assert connection.writes == writes + 1  # the script alone so far
        assert await busy == "done"
        assert await asyncio.gather(*echoes) == [f"e{n}" for n in range(20)]
        assert connection.writes == writes + 2  # the twenty echoes in one write
        assert await connection.call(["ECHO", "idle"]) == "idle"
        assert connection.writes == writes + 3
    finally:
        connection.close()
