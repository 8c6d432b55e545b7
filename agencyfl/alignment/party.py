"""What every alignment party does alike: its keys and directory, comparing parameters, reading its ids.

A party blinds nothing before it has compared its parameter fingerprint with every counterpart's
(``check_parameters``); the role classes (``register.py``, ``duplicates.py``) enforce it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

from agencyfl.alignment.errors import ParameterMismatchError, ProtocolError
from agencyfl.alignment.inputs import PreparedIds, prepare_ids
from agencyfl.alignment.psi import Blinder, Values, generate_key, parameter_fingerprint
from agencyfl.alignment.relay import Transport, receive_text, send_text
from agencyfl.alignment.sealed import PartyKeys, PartyPublicKeys


class Party:
    """One party of an alignment run (base of the roles).

    Parameters
    ----------
    keys
        Its sealing and signing keys.
    directory
        The public keys of every party it talks to, by name.
    salt
        The alignment salt.
    run
        The run id every envelope carries.
    workers
        Blinding processes, default ``os.cpu_count()``.
    batch_size
        Ids per batch, per task and per envelope.
    """

    def __init__(
        self,
        keys: PartyKeys,
        directory: Mapping[str, PartyPublicKeys],
        *,
        salt: bytes,
        run: str,
        workers: int | None,
        batch_size: int,
    ) -> None:
        self.keys = keys
        self.workers = workers
        self.directory = directory
        self.run = run
        self.batch_size = batch_size
        self._salt = salt
        self._fingerprint = parameter_fingerprint(salt)
        self._checked: set[str] = set()

    def __enter__(self) -> Party:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the blinding workers (the roles hold them)."""

    def _peer(self, name: str) -> PartyPublicKeys:
        try:
            return self.directory[name]
        except KeyError:
            raise ProtocolError(f"{self.keys.name}: no public keys for {name!r} in the directory") from None

    def send_parameters(self, transport: Transport, peers: Sequence[str]) -> None:
        """Send this party's parameter fingerprint to each of ``peers``."""
        for peer in peers:
            send_text(
                transport,
                self._fingerprint,
                run=self.run,
                sender=self.keys,
                recipient=self._peer(peer),
                kind="parameters",
            )

    def check_parameters(self, transport: Transport, peers: Sequence[str]) -> None:
        """Compare each peer's fingerprint with ours; required before this party blinds anything.

        Raises
        ------
        ParameterMismatchError
            If a peer's alignment parameters differ.
        """
        for peer in peers:
            theirs = receive_text(
                transport, run=self.run, recipient=self.keys, sender=self._peer(peer), kind="parameters"
            )
            if theirs != self._fingerprint:
                raise ParameterMismatchError(
                    f"{self.keys.name} and {peer} hold different alignment parameters (salt, id format, curve "
                    f"or hash): fingerprint {self._fingerprint[:16]}... against {theirs[:16]}...; nothing was blinded"
                )
            self._checked.add(peer)

    def _require_checked(self, peers: Iterable[str]) -> None:
        missing = sorted(set(peers) - self._checked)
        if missing:
            raise ParameterMismatchError(f"{self.keys.name}: parameters not yet compared with {missing}")

    def _blind_received(self, blinder: Blinder, values: Values, sender: str, kind: str) -> Values:
        """Blind values a counterpart sent; a value X25519 refuses (small order) is that sender's fault."""
        try:
            return blinder.blind(values)
        except ProtocolError as err:
            raise ProtocolError(f"the {kind} from {sender}: {err}") from err

    def _prepare(self, ids: Iterable[str]) -> PreparedIds:
        # The hash into the group costs about three quarters of a multiplication: it runs on every core. The pool's
        # key is never used (hash_batches does not blind) and is dropped with the pool.
        with Blinder(generate_key(), workers=self.workers, batch_size=self.batch_size) as pool:
            return prepare_ids(ids, self._salt, party=self.keys.name, batch_size=self.batch_size, pool=pool)
