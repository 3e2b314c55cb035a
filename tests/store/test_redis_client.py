"""creditd's own packing of Redis commands is the protocol redis-py writes."""

from __future__ import annotations

from redis.asyncio.connection import Connection

from creditd.store.redis_client import pack


def test_a_command_is_packed_as_redis_py_packs_it() -> None:
    redis_py = Connection()
    for args in (
        ["EVALSHA", "a" * 40, 2, "creditd:{ag}:w:c1:1", "creditd:{ag}:outbox", "1764590000.5", 0, -3, ""],
        ["SET", "creditd:{ag}:sms:c1:mé", "ünïcode"],  # lengths are counted in bytes
    ):
        assert pack(args) == b"".join(redis_py.pack_command(*args))
