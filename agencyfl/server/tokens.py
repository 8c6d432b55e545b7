"""The scoring service's token registry: bearer tokens the coordinator issued, bound to purposes.

A token is issued for named purposes and an expiry, and can be revoked; only its SHA-256 hash is
stored (a JSON file, 0600, rewritten atomically). The serving process re-reads the file when it
changes, so an issued or revoked token takes effect at once. Auditors list the registry with
``agencyfl coordinator tokens --format json`` (hashes' prefixes, never tokens).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agencyfl.federation.errors import DataFileError, TokenError
from agencyfl.federation.files import write_private_text

__all__ = ["DEFAULT_PURPOSE", "TokenError", "TokenRecord", "TokenStore", "token_hash"]

DEFAULT_PURPOSE = "eligibility-identification"
DEFAULT_DAYS = 30.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """One issued token: who holds it, for which purposes, until when, and whether it was revoked.

    ``id`` is the first 12 hex digits of the token's hash: enough to name it (``revoke-token --id``),
    useless for authenticating.
    """

    id: str
    requester: str
    purposes: tuple[str, ...]
    issued: str
    expires: str
    revoked: str | None = None

    def state(self, now: dt.datetime | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked is not None:
            return "revoked"
        if dt.datetime.fromisoformat(self.expires) <= (now or _now()):
            return "expired"
        return "active"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, with the state at this moment."""
        return {**asdict(self), "purposes": list(self.purposes), "state": self.state()}


def _parse(path: Path, text: str) -> dict[str, TokenRecord]:
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise DataFileError(f"token file {str(path)!r} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise DataFileError(f"token file {str(path)!r} is not a JSON object of token hashes")
    records: dict[str, TokenRecord] = {}
    for digest, entry in raw.items():
        if isinstance(entry, str):
            # Registries written before purposes existed: such a token is valid for nothing (reissue it).
            entry = {"requester": entry, "purposes": [], "issued": "", "expires": "1970-01-01T00:00:00+00:00"}
        if not isinstance(entry, dict):
            raise DataFileError(f"token file {str(path)!r}: entry {digest[:12]!r} is not an object")
        try:
            records[str(digest)] = TokenRecord(
                id=str(digest)[:12],
                requester=str(entry["requester"]),
                purposes=tuple(str(p) for p in entry["purposes"]),
                issued=str(entry.get("issued", "")),
                expires=dt.datetime.fromisoformat(str(entry["expires"])).isoformat(),
                revoked=None if entry.get("revoked") is None else str(entry["revoked"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFileError(f"token file {str(path)!r}: entry {digest[:12]!r} is malformed ({exc})") from None
    return records


class TokenStore:
    """Bearer tokens the coordinator issued: ``{sha256(token): {requester, purposes, expires, ...}}``.

    Parameters
    ----------
    path
        The JSON file (created on the first ``issue``).

    Raises
    ------
    TokenError
        The file exists but is not a token registry.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime = -1
        self._records: dict[str, TokenRecord] = {}
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> None:
        # Tokens issued or revoked while the server runs take effect at once: re-read when the file changes.
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._mtime = {}, 0
            return
        except OSError as exc:
            raise DataFileError(f"token file {str(self.path)!r} cannot be read ({exc.strerror})") from None
        if stat.st_mtime_ns != self._mtime:
            if not self.path.is_file():
                raise DataFileError(f"token file {str(self.path)!r} is not a file")
            try:
                text = self.path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise DataFileError(f"token file {str(self.path)!r} cannot be read ({exc})") from None
            self._records = _parse(self.path, text)
            self._mtime = stat.st_mtime_ns

    def _save(self) -> None:
        body = {
            digest: {k: v for k, v in asdict(r).items() if k != "id"} | {"purposes": list(r.purposes)}
            for digest, r in self._records.items()
        }
        write_private_text(self.path, json.dumps(body, indent=2) + "\n")
        self._mtime = self.path.stat().st_mtime_ns

    def issue(
        self, requester: str, purposes: list[str] | tuple[str, ...] = (DEFAULT_PURPOSE,), days: float = DEFAULT_DAYS
    ) -> str:
        """Create a token for ``requester`` valid for ``purposes`` during ``days``; returns it (shown once).

        Raises
        ------
        TokenError
            No purpose, an empty purpose or requester, or a non-positive validity.
        """
        clean = tuple(dict.fromkeys(p.strip() for p in purposes))
        if not clean or any(not p for p in clean):
            raise TokenError("a token needs at least one non-empty purpose")
        if not requester.strip():
            raise TokenError("a token needs a non-empty requester name")
        if not 0 < days <= 3660:
            raise TokenError(f"validity must be more than 0 and at most 3660 days (got {days!r})")
        token = secrets.token_urlsafe(32)
        digest = token_hash(token)
        now = _now().replace(microsecond=0)  # the file keeps whole seconds: truncate first, so validity is `days`
        with self._lock:
            self._reload()
            self._records[digest] = TokenRecord(
                id=digest[:12],
                requester=requester,
                purposes=clean,
                issued=now.isoformat(timespec="seconds"),
                expires=(now + dt.timedelta(days=days)).isoformat(timespec="seconds"),
            )
            self._save()
        return token

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke the token whose ``id`` (hash prefix, at least 8 hex digits) is given; idempotent.

        Raises
        ------
        TokenError
            No token, or more than one, has that id.
        """
        key = token_id.strip().lower()
        with self._lock:
            self._reload()
            matches = [d for d in self._records if len(key) >= 8 and d.startswith(key)]
            if len(matches) != 1:
                raise TokenError(f"no single token has id {token_id!r} (see `agencyfl coordinator tokens`)")
            record = self._records[matches[0]]
            if record.revoked is None:
                record = replace(record, revoked=_now().isoformat(timespec="seconds"))
                self._records[matches[0]] = record
                self._save()
            return record

    def records(self) -> list[TokenRecord]:
        """Every token ever issued from this file, oldest first (for auditors)."""
        with self._lock:
            self._reload()
            return sorted(self._records.values(), key=lambda r: (r.issued, r.id))

    def lookup(self, token: str) -> TokenRecord | None:
        """The active record of ``token``; None if unknown, expired or revoked."""
        with self._lock:
            self._reload()
            record = self._records.get(token_hash(token))
        return record if record is not None and record.state() == "active" else None

    def requester(self, token: str) -> str | None:
        """Who holds ``token`` (if active), or None."""
        record = self.lookup(token)
        return record.requester if record else None
