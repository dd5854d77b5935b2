"""What the generated pages (docs/results.md, docs/latents.md) share: the README block that
quotes a page, the link to it, and the message when a committed page is stale."""

from __future__ import annotations

from pathlib import Path

from robustbench_fvae.marked_block import replace_marked_block

REGENERATE = ("regenerate it with `python -m robustbench_fvae.protocol page` "
              "(never edit it by hand)")


class ResultsError(ValueError):
    """The results folder cannot make a page (missing, or no final runs)."""


def with_block(readme: Path, block: str, markers: tuple[str, str]) -> str:
    """The text of ``readme`` with the part between ``markers`` (both included) replaced by
    ``block`` (which carries the markers itself)."""
    new = replace_marked_block(readme.read_text(encoding="utf-8"), block, markers)
    if new is None:
        raise ResultsError(f"{readme} has no {markers[0]} … {markers[1]} markers where the page "
                           "is quoted; add them to the section that quotes the page")
    return new


def page_link(page: str | Path, readme: Path) -> str:
    """The page's path as the README links it (relative to the README's folder)."""
    try:
        return str(Path(page).resolve().relative_to(readme.resolve().parent))
    except ValueError:
        return str(page)


def stale_page_message(path: Path, actual: str, expected: str, sources: str) -> str:
    """What to tell a user whose ``path`` holds ``actual`` where the records in ``sources``
    give ``expected``: the first differing line, the heading it sits under, and the fix."""
    have, want = actual.splitlines(), expected.splitlines()
    line = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b),
                min(len(have), len(want)))
    heading = next((h.lstrip("# ") for h in reversed(want[:line + 1]) if h.startswith("#")),
                   None)
    where = f"from line {line + 1}" + (f", under '{heading}'" if heading else "")
    return f"{path} differs {where}, from what the records in {sources} give; {REGENERATE}"


def stale_files(page: str | Path, text: str, readme: str | Path | None, block: str,
                markers: tuple[str, str], sources: str) -> str | None:
    """None when ``page`` holds ``text`` and (``readme`` not None) the README's ``markers``
    block holds ``block``, else what differs and how to fix it."""
    path = Path(page)
    if not path.is_file():
        return f"{path} does not exist; {REGENERATE}"
    actual = path.read_text(encoding="utf-8")
    if actual != text:
        return stale_page_message(path, actual, text, sources)
    if readme and with_block(Path(readme), block, markers) != Path(readme).read_text(
            encoding="utf-8"):
        return (f"{readme}'s block between {markers[0]} and {markers[1]} differs from what "
                f"{sources} give; {REGENERATE}")
    return None
