"""Summarize a py-spy raw profile (`py-spy record --format raw`): where the samples went.

    python bench/profile_summary.py profile.txt [--top 30] [--match creditd]

Prints the functions with the largest inclusive share (the function or anything it called)
and self share, and the children of the event loop's Handle._run, i.e. which callbacks
and tasks the loop spent its time in.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarize(path: Path, top: int, match: str) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
        for i, frame in enumerate(frames):
            if frame.startswith("Handle._run") and i + 1 < len(frames):
                tasks[frames[i + 1]] += samples
                break
        else:
            tasks[f"(not in an event loop callback) {frames[-1]}"] += samples
    if not total:
        return "no samples"
    out = [f"{total} samples"]
    out.append("\n-- event loop callbacks and tasks (inclusive)")
    out += [f"{100 * n / total:5.1f}%  {name}" for name, n in tasks.most_common(top)]
    out.append(f"\n-- inclusive, functions matching {match!r}")
    out += [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common() if match in name][:top]
    out.append("\n-- self")
    out += [f"{100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="creditd")
    args = parser.parse_args()
    print(summarize(args.profile, args.top, args.match))


if __name__ == "__main__":
    main()
