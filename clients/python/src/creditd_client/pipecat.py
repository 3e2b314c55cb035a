"""Meter a Pipecat bot with creditd: one processor, first in the pipeline after the transport input.

    from creditd_client.pipecat import CreditdMeter

    meter = CreditdMeter(creditd, session_id=call_sid, client_id="dental-1", provider="elevenlabs")
    pipeline = Pipeline([transport.input(), meter, stt, llm, tts, transport.output()])

When the pipeline starts (the call is answered) the meter authorizes the call; the rest of
the pipeline starts only once creditd has answered. A refused call hears `denied_message`
and the pipeline ends. An allowed call is metered for as long as the pipeline runs: on
creditd's LowCreditWarning the bot says `goodbye`; on Cutoff the pipeline is cancelled at
once (the time that was paid for is over); when the pipeline ends for any other reason
(the caller hung up, the bot ended the call) the session is ended with the seconds the call
lasted. If creditd cannot be reached, the call is refused: nothing is granted that could not
be recorded. Needs `pip install 'creditd-client[pipecat]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pipecat.frames.frames import (
    CancelFrame,
    CancelWorkerFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    StartFrame,
    TTSSpeakFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from creditd_client.aio import Client
from creditd_client.enums import EnumArg
from creditd_client.errors import CreditdError, Denied
from creditd_client.types import Cutoff, LowCreditWarning
from creditd_client.voice import VoiceSession

__all__ = ["CreditdMeter"]

log = logging.getLogger("creditd_client")
DEFAULT_GOODBYE = "I'm sorry, we have to end the call here. Thank you for calling, goodbye."
DEFAULT_DENIED = "I'm sorry, this line cannot take calls right now. Please try again later. Goodbye."
# A lost stream is resumed this many times (well within the server's grace period) before
# the call is stopped, since nothing more could be metered.
RESUME_DELAYS = (0.2, 0.5, 1.0)


class CreditdMeter(FrameProcessor):
    """A Pipecat frame processor that authorizes, meters and cuts off one call.

    After the pipeline: `session` is the creditd VoiceSession (its `cutoff` or `summary` says
    how the call was settled), or `deny_reason` says why the call was refused.
    """

    def __init__(
        self,
        client: Client,
        *,
        session_id: str,
        client_id: str,
        provider: str = "",
        direction: EnumArg = "inbound",
        goodbye: str | None = DEFAULT_GOODBYE,
        denied_message: str | None = DEFAULT_DENIED,
        report_interval: float = 5.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self._client = client
        self.session_id = session_id
        self.client_id = client_id
        self.provider = provider
        self.direction = direction
        self.goodbye = goodbye
        self.denied_message = denied_message
        self.report_interval = report_interval
        self.session: VoiceSession | None = None
        self.deny_reason = ""
        self._follower: asyncio.Task[None] | None = None
        self._said_goodbye = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._answer(frame, direction)
            return
        if isinstance(frame, EndFrame | CancelFrame):
            await self._end_session()
        await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        await self._end_session()
        await super().cleanup()  # type: ignore[no-untyped-call]

    # -- the call ------------------------------------------------------------------------------

    async def _answer(self, start: StartFrame, direction: FrameDirection) -> None:
        """Authorize, then let the pipeline start; answer the call or refuse it politely."""
        try:
            self.session = await self._client.voice_session(
                self.session_id,
                self.client_id,
                direction=self.direction,
                provider=self.provider,
                report_interval=self.report_interval,
            )
        except Denied as denied:
            self.deny_reason = denied.reason
        except CreditdError as error:  # fail closed
            log.error("call %s refused: creditd did not authorize it: %s", self.session_id, error)
            self.deny_reason = error.reason
        await self.push_frame(start, direction)
        if self.session is not None:
            try:
                await self.session.answer()
            except CreditdError as error:
                log.error("call %s refused: its usage stream did not open: %s", self.session_id, error)
                self.deny_reason = error.reason
                await self.session.close()
                self.session = None
        if self.session is None:
            await self._refuse()
            return
        self._follower = self.create_task(self._follow(self.session), "creditd-meter")

    async def _refuse(self) -> None:
        if self.denied_message:
            await self.push_frame(TTSSpeakFrame(self.denied_message, append_to_context=False))
        # Downstream, after the message: the pipeline ends once it has been spoken.
        await self.push_frame(EndWorkerFrame(reason=f"creditd: {self.deny_reason}"))

    async def _follow(self, session: VoiceSession) -> None:
        """React to the session's events until it ends; resume a lost stream."""
        attempts = iter(RESUME_DELAYS)
        while True:
            try:
                async for event in session:
                    if isinstance(event, LowCreditWarning):
                        await self._say_goodbye()
                    elif isinstance(event, Cutoff):
                        # The paid time is over: stop now, not after what is queued.
                        await self.push_frame(
                            CancelWorkerFrame(reason=f"creditd cutoff: {event.reason}"), FrameDirection.UPSTREAM
                        )
                return
            except CreditdError as lost:
                delay = next(attempts, None)
                if delay is None:
                    log.error("call %s stopped: its usage stream is lost: %s", self.session_id, lost)
                    await self.push_frame(
                        CancelWorkerFrame(reason="creditd: usage stream lost"), FrameDirection.UPSTREAM
                    )
                    return
                await asyncio.sleep(delay)
                with contextlib.suppress(CreditdError):  # the next iteration reports it again
                    await session.resume()

    async def _say_goodbye(self) -> None:
        if self.goodbye and not self._said_goodbye:
            self._said_goodbye = True
            await self.push_frame(TTSSpeakFrame(self.goodbye, append_to_context=False))

    async def _end_session(self) -> None:
        """The pipeline ends: settle the call with the seconds it lasted (once)."""
        follower, self._follower = self._follower, None
        if follower is not None and follower is not asyncio.current_task():
            await self.cancel_task(follower)
        session = self.session
        if session is None:
            return
        try:
            if not session.ended:
                await session.hang_up()
        except CreditdError as error:
            # The server settles a session whose stream is gone after its grace period.
            log.error("call %s: SessionEnd failed: %s", self.session_id, error)
        finally:
            await session.close()
