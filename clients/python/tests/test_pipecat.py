"""CreditdMeter in real Pipecat pipelines (no network services) against a real creditd with 2-second slices."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import pytest
from conftest import CREDIT, Setup, unique
from pipecat.frames.frames import CancelFrame, EndFrame, Frame, StartFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from creditd_client import Cutoff, aio
from creditd_client.pipecat import CreditdMeter

EXHAUSTED = "DENY_REASON_CLIENT_CREDITS_EXHAUSTED"


@dataclass
class Seen:
    frame: Frame
    at: float  # time.monotonic()


class Recorder(FrameProcessor):  # type: ignore[misc]
    """The end of the pipeline (where the TTS and the transport output would be): keeps what arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame | TTSSpeakFrame | EndFrame | CancelFrame):
            self.seen.append(Seen(frame, time.monotonic()))
        await self.push_frame(frame, direction)

    def first(self, kind: type[Frame]) -> Seen:
        return next(s for s in self.seen if isinstance(s.frame, kind))


@dataclass
class Bot:
    meter: CreditdMeter
    recorder: Recorder = field(default_factory=Recorder)

    def __post_init__(self) -> None:
        self.worker = PipelineWorker(
            Pipeline([self.meter, self.recorder]), cancel_on_idle_timeout=False, enable_rtvi=False
        )

    async def run(self, deadline: float = 30) -> None:
        """Run the pipeline until it ends by itself (or fail after `deadline` seconds)."""
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        await asyncio.wait_for(runner.run(), deadline)


def meter(client: aio.Client, setup: Setup, **options: object) -> CreditdMeter:
    return CreditdMeter(
        client,
        session_id=unique("call"),
        client_id=setup.client_id,
        provider="elevenlabs",
        goodbye="Sorry, your time is up. Goodbye!",
        report_interval=0.5,
        **options,  # type: ignore[arg-type]
    )


async def test_the_pipeline_says_goodbye_and_stops_at_the_cutoff_second(client: aio.Client, setup: Setup) -> None:
    await client.topup(setup.client_id, 4 * CREDIT, unique("pay"))  # 4 seconds at one credit a second
    bot = Bot(meter(client, setup))
    await bot.run()

    session = bot.meter.session
    assert session is not None and session.cutoff == Cutoff(EXHAUSTED, 4)
    goodbye, cancel = bot.recorder.first(TTSSpeakFrame), bot.recorder.first(CancelFrame)
    assert goodbye.frame.text == "Sorry, your time is up. Goodbye!"
    assert goodbye.at < cancel.at  # the goodbye is pushed before the pipeline is stopped
    started = bot.recorder.first(StartFrame).at
    # It ran for the 4 paid seconds, and stopped at the cutoff (the server's timer, not a report).
    assert 3.9 <= cancel.at - started < 4 + 2.0
    balance = await client.get_balance(setup.client_id)
    assert (balance.voice.available_micros, balance.voice.reserved_micros) == (0, 0)
    assert balance.voice.period_used_micros == 4 * CREDIT


async def test_a_caller_hanging_up_ends_the_session_with_the_seconds_it_lasted(
    client: aio.Client, setup: Setup
) -> None:
    await client.topup(setup.client_id, 60 * CREDIT, unique("pay"))
    bot = Bot(meter(client, setup))

    async def caller_hangs_up() -> None:
        await asyncio.sleep(2.5)  # the length of the call, not a wait for a condition
        await bot.worker.queue_frame(EndFrame())

    hang_up = asyncio.ensure_future(caller_hangs_up())
    await bot.run()
    await hang_up

    session = bot.meter.session
    assert session is not None and session.summary is not None and session.cutoff is None
    lasted = bot.recorder.first(EndFrame).at - bot.recorder.first(StartFrame).at
    assert session.summary.billed_seconds >= 3  # 2.5 s, a started second counting as a whole one
    assert session.summary.billed_seconds <= math.ceil(lasted) + 1
    assert not any(isinstance(s.frame, TTSSpeakFrame) for s in bot.recorder.seen)  # no goodbye: time was left
    entries = [e async for e in client.list_ledger_entries(setup.client_id, balance_type="voice")]
    (usage,) = [e for e in entries if e.session_id == bot.meter.session_id]
    assert (usage.seconds, usage.provider, -usage.amount_micros) == (
        session.summary.billed_seconds,
        "elevenlabs",
        session.summary.billed_seconds * CREDIT,
    )


@pytest.mark.parametrize("message", ["This line is closed. Goodbye.", None])
async def test_a_refused_call_hears_the_message_and_ends(client: aio.Client, setup: Setup, message: str | None) -> None:
    bot = Bot(meter(client, setup, denied_message=message))  # no credits at all
    await bot.run()
    assert bot.meter.session is None and bot.meter.deny_reason == EXHAUSTED
    spoken = [s.frame.text for s in bot.recorder.seen if isinstance(s.frame, TTSSpeakFrame)]
    assert spoken == ([message] if message else [])
    assert isinstance(bot.recorder.seen[-1].frame, EndFrame)  # ended, after the message
    balance = await client.get_balance(setup.client_id)
    assert (balance.voice.reserved_micros, balance.voice.period_used_micros) == (0, 0)
