"""Ed25519 signing keys for ledgers (``cryptography``). A secret key never leaves its owner's folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agencyfl.federation.errors import LedgerError


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new key at ``path`` (PEM, owner-only permissions); refuses to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerError(f"cannot load signing key {str(path)!r}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{str(path)!r} is not an Ed25519 private key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, generated there on first use (inside the agency's own domain)."""
    return load_signing_key(path) if path.exists() else generate_signing_key(path)


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), the form auditors are handed."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot load public key {str(path)!r}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{str(path)!r} is not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _party_file(keyring: Path, party: str) -> Path:
    if not party or any(c in party for c in "/\\") or party.startswith("."):
        raise LedgerError(f"party name {party!r} is not usable as a key name")
    return Path(keyring) / f"{party}.pub"


def import_public_key(keyring: Path, party: str, source: Path) -> str:
    """Put ``party``'s ledger public key (a PEM file it handed over) in the auditor's keyring folder.

    Returns the key's fingerprint, to be compared with the one the party reads out of band. Refuses to
    replace a different key already held for ``party`` (a key change is a decision, not an accident).
    """
    key = load_public_key(source)
    target = _party_file(keyring, party)
    pem = public_pem(key)
    if target.exists() and target.read_bytes() != pem:
        raise LedgerError(f"the keyring already holds a different key for {party!r}; remove {target} to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pem)
    return key_id(key)


def export_public_key(source: Path, out: Path) -> str:
    """Write the public half of a signing key, or copy a public key, to ``out``; returns its fingerprint."""
    try:
        public = load_signing_key(source).public_key()
    except LedgerError:
        public = load_public_key(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(public_pem(public))
    return key_id(public)


def keyring_key(keyring: Path, party: str) -> Ed25519PublicKey | None:
    """``party``'s key from the keyring, or None when the keyring holds none."""
    path = _party_file(keyring, party)
    return load_public_key(path) if path.exists() else None


def keyring_parties(keyring: Path) -> dict[str, str]:
    """Every party in the keyring with its key's fingerprint."""
    return {p.stem: key_id(load_public_key(p)) for p in sorted(Path(keyring).glob("*.pub"))}
