"""A voice worker on creditd_client: answer a call and talk until the client's credits run out.

Start a server (`creditd serve`), then, with the key it printed:

    CREDITD_TOKEN=<admin key> python examples/voice_worker.py

Options: CREDITD_ADDRESS (default 127.0.0.1:50051). Needs `pip install -e clients/python`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

from creditd_client import Cutoff, Denied, Grant, LowCreditWarning, aio, format_credits, to_micros


async def main() -> None:
    run = uuid.uuid4().hex[:6]  # fresh ids, so the example can run again
    agency, client_id = f"acme-{run}", f"dental-{run}"

    async with aio.Client() as creditd:  # CREDITD_ADDRESS and CREDITD_TOKEN
        # Set up once by the platform and the agency: a plan at 60 credits a minute (one a
        # second) and a client who bought 5 credits.
        await creditd.create_agency(agency, "Acme Reception")
        await creditd.create_plan(agency, "per-second", default_voice_micros_per_minute=to_micros("60"))
        await creditd.create_client(client_id, agency, "per-second")
        await creditd.topup(client_id, to_micros("5"), f"payment-{run}")
        print(f"client {client_id}: 5 credits, 60 credits a minute")

        # The worker: a call rings. May it be answered?
        answered = time.monotonic()

        def say_goodbye(warning: LowCreditWarning) -> None:
            print(f"{time.monotonic() - answered:5.1f}s agent: time to say goodbye ({warning.remaining_seconds}s left)")

        session = await creditd.voice_session(f"call-{run}", client_id, provider="elevenlabs", on_warning=say_goodbye)
        print(f"authorized: {session.authorization.granted_seconds}s granted")

        await session.answer()  # the stream is open; usage is reported every 5 s by the session
        async for event in session:  # grants, the warning, then the cutoff
            elapsed = time.monotonic() - answered
            if isinstance(event, Grant):
                print(f"{elapsed:5.1f}s grant: may talk until second {event.granted_seconds}")
            elif isinstance(event, LowCreditWarning):
                print(f"{elapsed:5.1f}s warning: {event.remaining_seconds}s left")
            elif isinstance(event, Cutoff):
                print(f"{elapsed:5.1f}s cutoff: {event.reason}, billed {event.billed_seconds}s; hanging up")

        balance = await creditd.get_balance(client_id)
        print(
            f"client {client_id}: {format_credits(balance.voice.available_micros)} credits left, "
            f"{format_credits(balance.voice.period_used_micros)} used this period"
        )

        # The next call is refused before it is answered.
        try:
            await creditd.voice_session(f"call-{run}-2", client_id)
        except Denied as denied:
            print(f"next call refused: {denied.reason}")


if __name__ == "__main__":
    if not os.environ.get("CREDITD_TOKEN"):
        sys.exit("set CREDITD_TOKEN to the admin key that `creditd serve` printed")
    asyncio.run(main())
