"""Account numbers outside the warehouse: masked to their last four characters.

The warehouse and the workflow store keep account numbers whole (they join on them). Everything
that leaves them for people or for other systems' records — emails, the approval portal, Dagster
event metadata and log messages, CLI output, the drill's summary — shows `••••1234` only:

    mask_account("87654321")  == "••••4321"
    mask_account("123")       == "••••"       # four or fewer characters: nothing of it shown
    mask_accounts_in("ACC-0000016: lots.csv line 4 …", ["ACC-0000016"]) == "••••0016: lots.csv line 4 …"

One function, one place: an email, a log line and the drill show the same account the same way.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

MASK = "\u2022" * 4  # ••••


def mask_account(number: object) -> str:
    """••••1234: the last four characters when the number is longer than four (a shorter one is
    masked whole); nothing else of it is ever shown. None and '' mask to ••••."""
    text = "" if number is None else str(number).strip()
    return MASK + (text[-4:] if len(text) > 4 else "")


def masker(account_ids: Iterable[object]) -> Callable[[str], str]:
    """A function masking these account ids wherever they appear in a text (whole ids only, the
    longest first, so ACC-12 inside ACC-123 is left to ACC-123)."""
    ids = sorted({str(a).strip() for a in account_ids if a is not None and str(a).strip()}, key=len, reverse=True)
    if not ids:
        return lambda text: str(text)
    pattern = re.compile(r"(?<![A-Za-z0-9._-])(" + "|".join(map(re.escape, ids)) + r")(?![A-Za-z0-9._-])")
    return lambda text: pattern.sub(lambda m: mask_account(m[1]), str(text))


def mask_accounts_in(text: str, account_ids: Iterable[object]) -> str:
    """The text with each of these account ids masked (see `masker`)."""
    return masker(account_ids)(text)
