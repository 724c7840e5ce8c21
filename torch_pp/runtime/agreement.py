"""The start-up agreement: every rank runs a phase, and fails together if any rank failed.

Every rank reaches the same collective whether its phase worked or not, so a problem on one
rank becomes one clear error on all of them instead of a hang.
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable

from ..errors import StartupError
from ..net.transport import Transport

log = logging.getLogger("torch_pp")


def agree(transport: Transport, phase: Callable[[], object], *, what: str) -> object:
    """Run ``phase`` on every rank, then fail every rank if any rank failed.

    Every rank reaches the same collective whether its phase worked or not, so a
    problem on one rank becomes one clear error on all of them instead of a hang.

    Returns:
        The phase's result on this rank.

    Raises:
        StartupError: naming each failed rank, its host and its message.
    """
    result, error = None, None
    try:
        result = phase()
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = str(exc) or type(exc).__name__
        log.debug("rank %d failed to %s:\n%s", transport.rank, what, traceback.format_exc())
    rows = transport.all_gather({"rank": transport.rank, "host": transport.host, "error": error})
    failed = [r for r in rows if r["error"]]
    if not failed:
        return result
    if transport.world_size == 1:
        raise StartupError(failed[0]["error"])
    # Group identical messages so that N ranks with the same problem read as one line.
    groups: dict[str, list[dict]] = {}
    for r in failed:
        groups.setdefault(r["error"], []).append(r)
    lines = []
    for error, who in groups.items():
        ranks = ", ".join(str(r["rank"]) for r in who)
        hosts = ", ".join(sorted({r["host"] for r in who}))
        lines.append(f"{'rank' if len(who) == 1 else 'ranks'} {ranks} ({hosts}): {error}")
    raise StartupError(f"could not {what}:\n  " + "\n  ".join(lines))


def agree_on(transport: Transport, facts: dict[str, object]) -> None:
    """Fail every rank, naming ranks and values, unless all ranks hold the same ``facts``.

    Raises:
        StartupError: listing each fact that differs and what each rank has.
    """
    rows = transport.all_gather({"host": transport.host, **facts})
    problems = []
    for key in facts:
        values = [row[key] for row in rows]
        if len(set(map(str, values))) > 1:
            detail = "; ".join(f"rank {r} ({row['host']}): {row[key]}" for r, row in enumerate(rows))
            problems.append(f"ranks disagree on {key.replace('_', ' ')}: {detail}")
    if problems:
        raise StartupError("the ranks are not set up alike:\n  " + "\n  ".join(problems) +
                           "\n  Use the same model folder, torch_pp version and options on every machine")
