"""A Pipecat bot metered by creditd, offline: the call runs until the client's credits run out.

A real Pipecat pipeline with no network services: CreditdMeter, then a stand-in for the
speech side that prints what the bot would say. In a real bot the meter goes right after
`transport.input()`, before STT, the LLM and TTS.

Start a server (`creditd serve`), then, with the key it printed:

    CREDITD_TOKEN=<admin key> python examples/pipecat_bot.py

Options: CREDITD_ADDRESS (default 127.0.0.1:50051). Needs `pip install -e 'clients/python[pipecat]'`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

from creditd_client import aio, format_credits, to_micros
from creditd_client.pipecat import CreditdMeter
from loguru import logger
from pipecat.frames.frames import CancelFrame, EndFrame, Frame, StartFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


class Speaker(FrameProcessor):
    """Where TTS and the phone line would be: prints what the bot says and when the call ends."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.monotonic()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        elapsed = time.monotonic() - self.started
        if isinstance(frame, StartFrame):
            self.started = time.monotonic()
            print("  0.0s call connected")
        elif isinstance(frame, TTSSpeakFrame):
            print(f"{elapsed:5.1f}s bot: {frame.text}")
        elif isinstance(frame, CancelFrame | EndFrame):
            print(f"{elapsed:5.1f}s call ended ({type(frame).__name__})")
        await self.push_frame(frame, direction)


async def run_call(creditd: aio.Client, client_id: str, call_id: str) -> CreditdMeter:
    meter = CreditdMeter(
        creditd,
        session_id=call_id,
        client_id=client_id,
        provider="elevenlabs",
        goodbye="I'm sorry, we're out of time. Goodbye!",
        denied_message="This line can't take calls right now. Goodbye.",
    )
    worker = PipelineWorker(Pipeline([meter, Speaker()]), cancel_on_idle_timeout=False, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()  # until the pipeline ends: here, at the cutoff
    return meter


async def main() -> None:
    run = uuid.uuid4().hex[:6]  # fresh ids, so the example can run again
    agency, client_id = f"acme-{run}", f"dental-{run}"
    async with aio.Client() as creditd:  # CREDITD_ADDRESS and CREDITD_TOKEN
        await creditd.create_agency(agency, "Acme Reception")
        await creditd.create_plan(agency, "per-second", default_voice_micros_per_minute=to_micros("60"))
        await creditd.create_client(client_id, agency, "per-second")
        await creditd.topup(client_id, to_micros("6"), f"payment-{run}")
        print(f"client {client_id}: 6 credits at 60 credits a minute")

        meter = await run_call(creditd, client_id, f"call-{run}")
        session = meter.session
        assert session is not None
        print(f"first call: {session.final}")

        balance = await creditd.get_balance(client_id)
        print(f"client {client_id}: {format_credits(balance.voice.available_micros)} credits left")

        meter = await run_call(creditd, client_id, f"call-{run}-2")  # refused before it is answered
        print(f"second call refused: {meter.deny_reason}")


if __name__ == "__main__":
    logger.remove()  # Pipecat logs every step at DEBUG: keep its warnings only
    logger.add(sys.stderr, level="WARNING")
    if not os.environ.get("CREDITD_TOKEN"):
        sys.exit("set CREDITD_TOKEN to the admin key that `creditd serve` printed")
    asyncio.run(main())
