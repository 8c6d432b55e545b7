"""Resident identity numbers (GB 11643-1999): normalization and the check character.

An 18-character number is 17 digits and a check character over them (ISO 7064 MOD 11-2: weights
``2**(17 - i) mod 11``; the character is ``"10X98765432"[sum mod 11]``). People write them with
spaces or hyphens, a lower-case ``x`` and full-width digits (``１１０１…``); every party normalizes
the same way before alignment, and a number whose check character is wrong is quarantined with the
reason rather than silently matched or dropped.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata

import numpy as np

WEIGHTS = tuple(2 ** (17 - i) % 11 for i in range(17))
CHECK_CHARACTERS = "10X98765432"
_SEPARATORS = re.compile(r"[\s\-_.\u3000]+")
_SHAPE = re.compile(r"^\d{17}[\dX]$")


class InvalidResidentId(ValueError):
    """A string that is not a valid 18-character resident identity number; the message says why."""


def check_character(first17: str) -> str:
    """The GB 11643 check character of 17 ASCII digits."""
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise InvalidResidentId(f"expected 17 digits before the check character, got {first17!r}")
    return CHECK_CHARACTERS[sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True)) % 11]


def normalize(raw: str) -> str:
    """The canonical form of ``raw``: NFKC (full-width to ASCII), separators removed, ``X`` upper-case.

    Raises
    ------
    InvalidResidentId
        If the result is not 17 digits and a check character, or the check character is wrong.
    """
    text = _SEPARATORS.sub("", unicodedata.normalize("NFKC", raw)).upper()
    if not _SHAPE.match(text):
        raise InvalidResidentId(f"not 17 digits and a check character: {raw!r}")
    expected = check_character(text[:17])
    if text[17] != expected:
        raise InvalidResidentId(f"check character {text[17]!r} should be {expected!r}: {raw!r}")
    return text


def canonical_or_none(raws: list[str]) -> list[str | None]:
    """``normalize`` of each, None where invalid; numbers already in canonical form (18 ASCII characters) are
    checked together with numpy, the rest one by one (the screening lists tens of thousands at once)."""
    out: list[str | None] = [None] * len(raws)
    fast = [i for i, r in enumerate(raws) if len(r) == 18 and r.isascii()]
    if fast:
        chars = np.frombuffer("".join(raws[i] for i in fast).upper().encode("ascii"), dtype=np.uint8).reshape(-1, 18)
        digits = chars[:, :17].astype(np.int64) - ord("0")
        shaped = ((digits >= 0) & (digits <= 9)).all(axis=1)
        expected = np.frombuffer(CHECK_CHARACTERS.encode(), dtype=np.uint8)[(digits @ np.array(WEIGHTS)) % 11]
        good = shaped & (chars[:, 17] == expected)
        for k, i in enumerate(fast):
            if good[k]:
                out[i] = raws[i].upper()
    for i, raw in enumerate(raws):
        if out[i] is None:
            with contextlib.suppress(InvalidResidentId):
                out[i] = normalize(raw)
    return out
