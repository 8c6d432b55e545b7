"""Synthetic resident identity numbers (GB 11643) for household heads, and the ways people write them.

A number is a six-digit area code, the birth date (YYYYMMDD), a three-digit sequence and the check
character (``agencyfl.federation.resident_id``). The area codes are ``xx99yy``: real province codes
with prefecture 99, which GB/T 2260 does not assign, so a synthetic number cannot be a real person's
(shape and check character are still exactly those of a real one). Everything is vectorized (numpy):
a million numbers take well under a second. The check character is computed with the weights and
characters of ``resident_id`` and the tests check every number against ``resident_id.normalize``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from agencyfl.federation.resident_id import CHECK_CHARACTERS, WEIGHTS

# The synthetic city's six districts (the population's ``_district`` 0-5; 4 and 5 are rural counties),
# then the areas where heads who moved to the city were born.
LOCAL_AREAS = (519901, 519902, 519903, 519904, 519905, 519906)
BIRTH_AREAS_ELSEWHERE = (429901, 509901, 539901, 449901)
BORN_ELSEWHERE = 0.15
"""Share of heads whose number carries another area's code (born elsewhere, moved to the city)."""

REFERENCE_DATE = np.datetime64("2024-07-01")
_EPOCH = np.datetime64("1900-01-01")
_DAYS = int((REFERENCE_DATE - _EPOCH).astype(int)) + 1
_AREAS = np.array(LOCAL_AREAS + BIRTH_AREAS_ELSEWHERE, dtype=np.int64)
_WEIGHTS = np.array(WEIGHTS, dtype=np.int64)
_CHECKS = np.array(list(CHECK_CHARACTERS))
# A str table (index = code point) as numpy's translate wants it: digits and x/X to their full-width forms.
_FULLWIDTH = "".join(chr(0xFF10 + c - 0x30) if 0x30 <= c <= 0x39 else chr(c) for c in range(128))
_FULLWIDTH = _FULLWIDTH.replace("X", "Ｘ").replace("x", "ｘ")

Strings = npt.NDArray[np.str_]

STYLES = ("lower_x", "spaced", "hyphen", "fullwidth", "ideographic", "padded")
"""How people write a number: ``lower_x`` (``...123x``), ``spaced`` (``519901 19800101 123X``),
``hyphen`` (``519901-19800101-123X``), ``fullwidth`` digits (``５１９９…``), ``ideographic`` (an
ideographic space after the area code), ``padded`` (a trailing space). ``lower_x`` combines with the
others; the others exclude each other."""


def check_characters(first17: npt.NDArray[np.int64]) -> Strings:
    """The GB 11643 check characters of 17-digit numbers given as integers (vectorized)."""
    total = np.zeros(len(first17), dtype=np.int64)
    for i, weight in enumerate(_WEIGHTS):
        total += (first17 // 10 ** (16 - i)) % 10 * weight
    return _CHECKS[total % 11]


class HeadIds:
    """Draws unique numbers for household heads, chunk after chunk, in bounded memory.

    Uniqueness is by construction: a counter per (area, birth date) gives each head a distinct
    sequence number (a fixed per-key offset plus 389 times the counter, mod 1000; 389 is prime to
    1000), so no set of issued numbers is kept. Raises ValueError if more than 1000 heads share an
    area and birth date (far beyond any population this generator is asked for).
    """

    def __init__(self) -> None:
        self._issued = np.zeros(len(_AREAS) * _DAYS, dtype=np.int64)

    def draw(
        self, district: npt.NDArray[np.int64], head_age: npt.NDArray[np.int64], rng: np.random.Generator
    ) -> Strings:
        """Canonical 18-character numbers for heads of the given districts and ages."""
        n = len(district)
        area = np.where(
            rng.random(n) < BORN_ELSEWHERE, len(LOCAL_AREAS) + rng.integers(0, len(BIRTH_AREAS_ELSEWHERE), n), district
        )
        # born between age + 1 and age years before the reference date
        days_back = np.floor(head_age * 365.2425 + rng.random(n) * 365.0).astype(np.int64)
        birth = REFERENCE_DATE - days_back.astype("timedelta64[D]")
        key = area * _DAYS + (birth - _EPOCH).astype(np.int64)
        order = np.argsort(key, kind="stable")
        ranked = key[order]
        first = np.ones(n, dtype=bool)
        first[1:] = ranked[1:] != ranked[:-1]
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - start
        count = self._issued[key] + rank
        if n and int(count.max()) >= 1000:
            raise ValueError("more than 1000 heads share an area code and birth date: population too large")
        self._issued += np.bincount(key, minlength=len(self._issued))
        sequence = (key * 2654435761 + 389 * count) % 1000
        year = birth.astype("datetime64[Y]").astype(np.int64) + 1970
        month = birth.astype("datetime64[M]").astype(np.int64) % 12 + 1
        day = (birth - birth.astype("datetime64[M]")).astype(np.int64) + 1
        first17 = _AREAS[area] * 10**11 + (year * 10_000 + month * 100 + day) * 1000 + sequence
        return np.strings.add(first17.astype("U17"), check_characters(first17))


def mistype(ids: Strings, rng: np.random.Generator) -> tuple[Strings, Strings]:
    """``ids`` with one mistake each, so that the check character no longer fits; and the kind of mistake.

    Half get a wrong check character, half a wrong digit among the first 17. MOD 11-2 detects every
    single substitution (the weights are all nonzero mod the prime 11), so each result is invalid.
    """
    n = len(ids)
    kind = np.where(np.arange(n) % 2 == 0, "check-character", "digit")
    wrong = ids.astype("U18").copy()
    for i in range(n):
        text = str(ids[i])
        if kind[i] == "check-character":
            current = CHECK_CHARACTERS.index(text[17])
            replacement = CHECK_CHARACTERS[(current + 1 + int(rng.integers(0, 10))) % 11]
            wrong[i] = text[:17] + replacement
        else:
            at = int(rng.integers(6, 17))  # not the area code: the number still looks local
            digit = str((int(text[at]) + 1 + int(rng.integers(0, 9))) % 10)
            wrong[i] = text[:at] + digit + text[at + 1 :]
    return wrong, kind.astype("U15")


def written(ids: Strings, styles: Mapping[str, float], rng: np.random.Generator) -> Strings:
    """``ids`` as people write them: each style of ``STYLES`` applied to about its share of the numbers."""
    unknown = sorted(set(styles) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown id styles {unknown!r} (known: {STYLES!r})")
    if sum(styles.get(style, 0.0) for style in STYLES[1:]) > 1.0:
        raise ValueError(f"the shares of the exclusive id styles sum to more than 1: {dict(styles)!r}")
    n = len(ids)
    out = ids.astype("U24")
    if styles.get("lower_x", 0.0) > 0:
        lower = rng.random(n) < styles["lower_x"]
        out[lower] = np.strings.lower(out[lower])
    pick = rng.random(n)
    low = 0.0
    for style in STYLES[1:]:
        share = styles.get(style, 0.0)
        chosen = (pick >= low) & (pick < low + share)
        low += share
        if not chosen.any():
            continue
        raw = out[chosen]
        head, middle, tail = np.strings.slice(raw, 0, 6), np.strings.slice(raw, 6, 14), np.strings.slice(raw, 14, 18)
        if style == "spaced":
            out[chosen] = _join((head, middle, tail), " ")
        elif style == "hyphen":
            out[chosen] = _join((head, middle, tail), "-")
        elif style == "fullwidth":
            out[chosen] = np.strings.translate(raw, _FULLWIDTH)
        elif style == "ideographic":
            out[chosen] = np.strings.add(np.strings.add(head, "\u3000"), np.strings.slice(raw, 6, 18))
        elif style == "padded":
            out[chosen] = np.strings.add(raw, " ")
    return out


def _join(parts: tuple[Strings, ...], separator: str) -> Strings:
    joined = parts[0]
    for part in parts[1:]:
        joined = np.strings.add(np.strings.add(joined, separator), part)
    return joined
