"""An SMS sender on creditd_client: send messages until the client's SMS credits run out.

Start a server (`creditd serve`), then, with the key it printed:

    CREDITD_TOKEN=<admin key> python examples/sms_sender.py

Options: CREDITD_ADDRESS (default 127.0.0.1:50051). Needs `pip install -e clients/python`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from creditd_client import SessionClosed, aio, format_credits, to_micros

OUTBOX = [("US", 1), ("GB", 1), ("US", 2), ("GB", 1), ("US", 1)]  # (country, segments)


async def main() -> None:
    run = uuid.uuid4().hex[:6]
    agency, client_id = f"acme-{run}", f"dental-{run}"

    async with aio.Client() as creditd:  # CREDITD_ADDRESS and CREDITD_TOKEN
        # A plan with SMS prices per country (credits per segment), and a client with 1 SMS credit.
        await creditd.create_agency(agency, "Acme Reception")
        await creditd.create_plan(
            agency,
            "texting",
            default_voice_micros_per_minute=to_micros("1"),
            sms_rates={"GB": to_micros("0.4")},
            default_sms_micros_per_segment=to_micros("0.166"),
        )
        await creditd.create_client(client_id, agency, "texting")
        await creditd.topup(client_id, to_micros("1"), f"payment-{run}", balance_type="sms")
        print(f"client {client_id}: 1 SMS credit; US 0.166, GB 0.4 a segment")

        async with creditd.sms_sender(client_id) as sender:
            for number, (country, segments) in enumerate(OUTBOX, start=1):
                message_id = f"msg-{run}-{number}"
                try:
                    result = await sender.send(message_id, country, segments)
                except SessionClosed as closed:
                    print(f"message {number} to {country}: not sent, the sender is closed ({closed.reason})")
                    break
                if result.allowed:
                    print(f"message {number} to {country}: sent, {format_credits(result.charged_micros)} credits")
                else:
                    print(f"message {number} to {country}: denied, {result.deny_reason}")
            final = await sender.close()
            print(f"sender closed: {final}")

        balance = await creditd.get_balance(client_id)
        print(f"client {client_id}: {format_credits(balance.sms.available_micros)} SMS credits left")


if __name__ == "__main__":
    if not os.environ.get("CREDITD_TOKEN"):
        sys.exit("set CREDITD_TOKEN to the admin key that `creditd serve` printed")
    asyncio.run(main())
