"""An agency's site: its spec copy, its data file and its home folder (ledger and keys).

Everything here stays in the agency's domain: records are read from ``data_path`` and never leave;
the ledger signing key is created under ``home/keys`` on first use and never travels.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agencyfl.federation.errors import LedgerError
from agencyfl.federation.spec import LoadedSpec, load_spec
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger

ORIGIN_FILE = "ledger-origin.json"


class AgencySite(BaseModel):
    """Where one agency keeps what it needs to take part."""

    model_config = ConfigDict(frozen=True)

    agency: str
    spec_path: Path
    data_path: Path
    home: Path
    keys_dir: Path | None = None  # default: home/keys
    coordinator_key: Path | None = None  # the coordinator's public ledger key; None: every job plan is refused
    root_certificate: Path | None = None  # the federation's CA certificate (a vertical job's stream checks it)

    @property
    def ledger_dir(self) -> Path:
        """The agency's privacy ledger folder."""
        return self.home / "ledger"

    @property
    def signing_key_path(self) -> Path:
        """The agency's ledger signing key (secret; owner-only permissions)."""
        return (self.keys_dir or self.home / "keys") / "ledger-signing.key"

    @property
    def salt_path(self) -> Path:
        """Beside the signing key: the secret salt of the validation split (who is in it stays secret)."""
        return self.signing_key_path.with_name("validation-salt")

    def validation_salt(self) -> str:
        """The salt of the agency's validation split, 32 random bytes made on first use (owner-only file).

        With a public salt (the federation's name, before) anyone could compute which households are
        in the split, and so whom an evaluation release concerns.
        """
        path = self.salt_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return path.read_text().strip()
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip()

    @property
    def origin_path(self) -> Path:
        """Beside the signing key: the origin of the ledger this key began (the key's memory of it)."""
        return self.signing_key_path.with_name(ORIGIN_FILE)

    def open_ledger(self) -> Ledger:
        """The agency's ledger, verified and bound to this agency; a fresh one gets its signed genesis.

        The signing key remembers the origin of the ledger it began (``ledger-origin.json`` beside
        it), so a ledger folder that was deleted, renamed or swapped is not silently replaced by a
        fresh one with a fresh budget.

        Raises
        ------
        LedgerError
            If the ledger does not verify, names another party, or is missing or replaced while this
            agency's key began another one.
        """
        ledger = Ledger(self.ledger_dir, load_or_create_signing_key(self.signing_key_path), party=self.agency)
        check = ledger.verification()
        remembered = self._remembered_origin()
        if check.last_seq < 0:
            if remembered:
                raise LedgerError(
                    f"ledger {str(self.ledger_dir)!r} is missing or empty, but this agency's key began ledger "
                    f"{remembered[:12]} before ({self.origin_path}): restore that ledger (a new one would reset "
                    "the lifetime budget)"
                )
            origin = ledger.ensure_genesis(self.agency)
            self._remember_origin(origin)
            return ledger
        if check.party != self.agency:
            raise LedgerError(f"ledger {str(self.ledger_dir)!r} belongs to {check.party!r}, not {self.agency!r}")
        if remembered and remembered != check.origin:
            raise LedgerError(
                f"ledger {str(self.ledger_dir)!r} begins at {check.origin[:12]}, but this agency's key began "
                f"ledger {remembered[:12]} ({self.origin_path}): the ledger was replaced; restore the original"
            )
        if not remembered:
            self._remember_origin(check.origin)  # a ledger from before the key kept its origin
        return ledger

    def _remembered_origin(self) -> str:
        try:
            data = json.loads(self.origin_path.read_text())
            return str(data["origin"]) if isinstance(data, dict) else ""
        except FileNotFoundError:
            return ""
        except (OSError, ValueError, KeyError) as exc:
            raise LedgerError(f"{self.origin_path} is unreadable ({exc.__class__.__name__}); restore it") from exc

    def _remember_origin(self, origin: str) -> None:
        tmp = self.origin_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"party": self.agency, "origin": origin, "ledger": str(self.ledger_dir)}))
        tmp.replace(self.origin_path)


def site_spec(site: AgencySite) -> LoadedSpec:
    """The agency's own copy of the spec."""
    return load_spec(site.spec_path)
