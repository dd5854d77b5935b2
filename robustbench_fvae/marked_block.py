"""Blocks that a command regenerates inside committed Markdown (the README's results, latents and
methods blocks), each between a begin and an end marker."""

from __future__ import annotations


def replace_marked_block(text: str, block: str, markers: tuple[str, str]) -> str | None:
    """``text`` with the part between ``markers`` (both included, and one newline after the end
    marker) replaced by ``block``, which carries the markers itself; None when ``text`` lacks
    them in that order."""
    first, last = markers
    begin, end = text.find(first), text.find(last)
    if begin < 0 or end < begin:
        return None
    rest = text[end + len(last):]
    return text[:begin] + block + (rest[1:] if rest.startswith("\n") else rest)
