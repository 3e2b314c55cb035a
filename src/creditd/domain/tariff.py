"""What one payer owes for a voice session, on cumulative seconds.

A payer's price can change between slices (a plan update takes effect from the next
slice), so its tariff is a list of segments, each (first second, rate per minute). The
cost of a segment is rounded up on the seconds inside it, so slicing a call never changes
its total: cost(S) = sum over segments of ceil(rate * seconds_in_segment / 60).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from creditd.domain.money import SECONDS_PER_MINUTE, ceil_div, voice_cost


@dataclass
class Tariff:
    segments: list[tuple[int, int]] = field(default_factory=list)  # (start second, micros/minute)

    def cost(self, seconds: int) -> int:
        total = 0
        for index, (start, rate) in enumerate(self.segments):
            if start >= seconds:
                break
            end = self.segments[index + 1][0] if index + 1 < len(self.segments) else seconds
            total += voice_cost(rate, min(end, seconds) - start)
        return total

    def price_from(self, granted: int, rate: int) -> None:
        """Charge `rate` from second `granted` on (the start of the next slice)."""
        price_from(self.segments, granted, rate)

    def terms(self, granted: int) -> SliceTerms:
        """The numbers a store needs to reserve seconds beyond `granted` in one atomic step."""
        start, rate = self.segments[-1]
        closed = self.cost(start)
        return SliceTerms(rate=rate, carry=self.cost(granted) - closed, offset=granted - start)


def price_from(segments: list[tuple[int, int]], granted: int, rate: int) -> None:
    """Charge `rate` from second `granted` on, in a list of (start second, rate) segments."""
    if segments and segments[-1][0] == granted:
        segments.pop()  # it priced no second yet: replace it
    if segments and segments[-1][1] == rate:
        return
    segments.append((granted, rate))


@dataclass(slots=True)
class SliceTerms:
    """Reserving n more seconds costs ceil(rate * (offset + n) / 60) - carry micro-credits."""

    rate: int
    carry: int
    offset: int

    def needed(self, seconds: int) -> int:
        return ceil_div(self.rate * (self.offset + seconds), SECONDS_PER_MINUTE) - self.carry

    def affordable(self, headroom: int | None) -> int | None:
        """The most extra seconds that `headroom` micro-credits pay for (None: unbounded)."""
        if headroom is None or self.rate <= 0:
            return None
        return max(0, (headroom + self.carry) * SECONDS_PER_MINUTE // self.rate - self.offset)
