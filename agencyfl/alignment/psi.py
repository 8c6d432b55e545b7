"""Diffie-Hellman PSI over X25519: hashing ids into the prime-order group, blinding on all cores, matching.

``u(id)`` is the Montgomery u-coordinate of ``Elligator2(SHA-256(salt || id))`` with the cofactor
cleared, a point of Curve25519's prime-order subgroup, and ``blind(k, u) = X25519(k, u)`` (RFC 7748).
Blinding commutes, ``blind(a, blind(b, u)) == blind(b, blind(a, u))``, which is all DH-PSI needs
(Huberman, Franklin and Hogg 1999). Values travel and are stored as one contiguous
``uint8`` array of shape ``(n, 32)``, never as a Python object per id; matching sorts the 32-byte
rows and searches them. ``docs/alignment.md`` is the design.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl.bindings import crypto_core_ed25519_from_uniform

from agencyfl.alignment.errors import ProtocolError

ID_FORMAT = "GB11643-1999"
CURVE = "X25519"
HASH = "sha256-elligator2-ed25519-to-x25519"
"""The hash's name in the parameter fingerprint: parameters of the former ``SHA-256`` hash do not match."""
VALUE_BYTES = 32
DEFAULT_BATCH = 16_384
"""Ids read per batch and values per envelope (512 KiB): memory per batch stays bounded."""

TASK_ROWS = 2048
"""Values per worker task at most (about 80 ms of one core; 130 ms when the task also hashes)."""
_IN_FLIGHT = 4
"""Tasks queued per worker: enough to cover the caller's work between submissions, and bounded."""
_INLINE = 1024
"""Up to this many values are blinded in the calling process (40 ms): a pool would cost more than it saves."""

Values = npt.NDArray[np.uint8]
"""Blinded or hashed values: a C-contiguous ``uint8`` array of shape ``(n, 32)``."""

_DOMAIN = b"agencyfl/alignment/v1"


def parameter_fingerprint(salt: bytes, id_format: str = ID_FORMAT, curve: str = CURVE) -> str:
    """The hex SHA-256 of the alignment parameters, which parties compare before any blinding.

    Parameters
    ----------
    salt
        The federation's alignment salt.
    id_format
        How ids are normalized, default ``ID_FORMAT``.
    curve
        The blinding curve, default ``CURVE``.
    """
    digest = hashlib.sha256(_DOMAIN)
    for part in (salt, id_format.encode(), curve.encode(), HASH.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no two tuples collide
    return digest.hexdigest()


_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1  # an Ed25519 encoding's top bit is the sign of x


def digest_id(salt: bytes, resident_id: str) -> bytes:
    """``SHA-256(salt || resident_id)``: the uniform string that ``to_curve`` maps to a point."""
    return hashlib.sha256(salt + resident_id.encode("ascii")).digest()


def edwards_to_u(points: bytes) -> bytes:
    """Montgomery u-coordinates ``(1 + y) / (1 - y) mod p`` of concatenated 32-byte Ed25519 encodings.

    RFC 7748 section 4.1 gives the birational map. One modular inversion serves the whole batch
    (Montgomery's trick: prefix products, one ``pow(x, p - 2, p)``, then three multiplications per
    point), so the conversion costs a few microseconds per point, not an inversion each.

    Raises
    ------
    ValueError
        If a point has ``y == 1`` (the neutral element, which has no u-coordinate), or the length is
        not a whole number of 32-byte points.
    """
    if len(points) % VALUE_BYTES:
        raise ValueError(f"{len(points)} bytes is not a whole number of {VALUE_BYTES}-byte points")
    ys = [int.from_bytes(points[i : i + VALUE_BYTES], "little") & _Y_MASK for i in range(0, len(points), VALUE_BYTES)]
    dens = [(1 - y) % _P for y in ys]
    prefix = []
    acc = 1
    for den in dens:
        prefix.append(acc)
        acc = acc * den % _P
    if acc == 0:
        raise ValueError("a point is the neutral element (y == 1): it has no u-coordinate")
    inv = pow(acc, _P - 2, _P)  # the inverse of the product of all denominators
    out = [b""] * len(ys)
    for i in range(len(ys) - 1, -1, -1):
        out[i] = ((1 + ys[i]) * prefix[i] % _P * inv % _P).to_bytes(VALUE_BYTES, "little")
        inv = inv * dens[i] % _P  # now the inverse of the product of the first i denominators
    return b"".join(out)


def to_curve(digests: bytes) -> bytes:
    """The u-coordinates of concatenated 32-byte digests, each hashed into the prime-order subgroup.

    libsodium's ``crypto_core_ed25519_from_uniform`` maps 32 bytes by Elligator 2 (RFC 9380 section
    6.7.1; the top bit chooses the sign of x) to Edwards25519 and multiplies by the cofactor 8, so the
    point is in the subgroup of prime order ``2^252 + ...``; ``edwards_to_u`` moves it to the Montgomery
    form X25519 uses. A raw 32-byte u lies on the curve's quadratic twist for about half of all inputs,
    and X25519 keeps that bit through blinding: a hash into the subgroup leaves nothing of the kind.

    Raises
    ------
    ValueError
        As ``edwards_to_u`` (a neutral element: probability about 2^-250 per digest).
    """
    step = VALUE_BYTES
    return edwards_to_u(
        b"".join(crypto_core_ed25519_from_uniform(digests[i : i + step]) for i in range(0, len(digests), step))
    )


def hash_to_u(salt: bytes, resident_id: str) -> bytes:
    """``u(id)``: the u-coordinate of a normalized id, hashed into Curve25519's prime-order subgroup."""
    return to_curve(digest_id(salt, resident_id))


def generate_key() -> bytes:
    """A fresh blinding key: 32 bytes from the OS CSPRNG (X25519 clamps it when used)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def blind(key: bytes, u: bytes) -> bytes:
    """``X25519(key, u)``: one scalar multiplication.

    Raises
    ------
    ProtocolError
        If ``u`` is a point of small order (X25519 then yields zero, which OpenSSL refuses).
    """
    try:
        return X25519PrivateKey.from_private_bytes(key).exchange(X25519PublicKey.from_public_bytes(u))
    except ValueError as err:
        raise ProtocolError(f"a value is not usable as an X25519 u-coordinate: {err}") from err


def _blind_bytes(key: X25519PrivateKey, chunk: bytes) -> bytes:
    load = X25519PublicKey.from_public_bytes
    return b"".join(key.exchange(load(chunk[i : i + VALUE_BYTES])) for i in range(0, len(chunk), VALUE_BYTES))


_WORKER_KEY: X25519PrivateKey | None = None


def _init_worker(key: bytes) -> None:
    global _WORKER_KEY
    _WORKER_KEY = X25519PrivateKey.from_private_bytes(key)


def _worker_blind(chunk: bytes) -> bytes:
    assert _WORKER_KEY is not None, "worker started without its key"
    return _blind_bytes(_WORKER_KEY, chunk)


def _hash_and_blind_bytes(key: X25519PrivateKey, chunk: bytes) -> bytes:
    points = to_curve(chunk)
    return points + _blind_bytes(key, points)


def _worker_hash_and_blind(chunk: bytes) -> bytes:
    assert _WORKER_KEY is not None, "worker started without its key"
    return _hash_and_blind_bytes(_WORKER_KEY, chunk)


def as_values(data: bytes) -> Values:
    """A read-only ``(n, 32)`` view of concatenated 32-byte values (no copy).

    Raises
    ------
    ProtocolError
        If the length is not a multiple of 32.
    """
    if len(data) % VALUE_BYTES:
        raise ProtocolError(f"{len(data)} bytes is not a whole number of {VALUE_BYTES}-byte values")
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, VALUE_BYTES)


class Blinder:
    """Blinds with one key on all cores: a process pool whose workers each receive the key once.

    Use as a context manager; the pool starts on first use and stops on exit.

    Parameters
    ----------
    key
        The 32-byte blinding key (``generate_key``).
    workers
        Processes to use, default ``os.cpu_count()``; ``1`` blinds in this process, without a pool.
    batch_size
        At most this many values per task, default ``DEFAULT_BATCH``; tasks are also at most
        ``TASK_ROWS`` and at least four per worker. At most ``4 * workers`` tasks are in flight, so
        memory outside the input and output arrays stays bounded.
    """

    def __init__(self, key: bytes, *, workers: int | None = None, batch_size: int = DEFAULT_BATCH) -> None:
        if len(key) != VALUE_BYTES:
            raise ValueError(f"a blinding key is {VALUE_BYTES} bytes, got {len(key)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._key = key
        self.workers = workers or os.cpu_count() or 1
        self.batch_size = batch_size
        self.multiplications = 0
        """Scalar multiplications done so far (what ``register_multiplications`` predicts)."""
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Blinder:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # fork: workers start in milliseconds and need no __main__ guard in the caller; they run only
            # _worker_blind and _worker_hash_and_blind, which touch no lock another thread of the parent could hold.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker,
                initargs=(self._key,),
            )
        return self._pool

    def _task_rows(self, n: int) -> int:
        # Short tasks (130 ms at most) and at least four per worker: when a call ends, no core idles long
        # while another finishes its last task; a task's round trip costs well under 1 % of it.
        return max(1, min(self.batch_size, TASK_ROWS, -(-n // (4 * self.workers))))

    def _chunks(self, values: Values, rows: int) -> Iterator[tuple[int, bytes]]:
        for start in range(0, len(values), rows):
            yield start, values[start : start + rows].tobytes()

    def blind(self, values: Values) -> Values:
        """``blind(key, v)`` for every row of ``values``, in order.

        Raises
        ------
        ProtocolError
            If a value is a point of small order.
        """
        if values.ndim != 2 or values.shape[1] != VALUE_BYTES:
            raise ProtocolError(f"expected rows of {VALUE_BYTES} bytes, got shape {values.shape}")
        out = np.empty_like(values)
        try:
            if self.workers == 1 or len(values) <= _INLINE:
                key = X25519PrivateKey.from_private_bytes(self._key)
                for start, chunk in self._chunks(values, self.batch_size):
                    out[start : start + self.batch_size] = as_values(_blind_bytes(key, chunk))
            else:
                self._blind_in_pool(values, out)
        except ValueError as err:
            raise ProtocolError(f"a value is not usable as an X25519 u-coordinate: {err}") from err
        self.multiplications += len(values)
        return out

    def blind_batches(self, batches: Iterable[Values]) -> Values:
        """``blind`` over batches as they arrive, concatenated in order.

        The caller's iterator runs in this process while the workers blind earlier batches, so reading
        and normalizing ids overlaps the multiplications instead of preceding them. An error the
        iterator raises (reading the party's own input) propagates as it is.

        Raises
        ------
        ProtocolError
            If a value is a point of small order.
        """
        if self.workers == 1:
            parts = [self.blind(batch) for batch in batches]
            return np.concatenate(parts) if parts else np.empty((0, VALUE_BYTES), dtype=np.uint8)
        done, count = self._stream(batches, _worker_blind, counterpart=True)
        self.multiplications += count
        return as_values(b"".join(done))

    def hash_and_blind_batches(self, batches: Iterable[Values]) -> tuple[Values, Values]:
        """``to_curve`` and then ``blind`` over batches of the party's own digests, in the workers.

        The hash into the group costs about three quarters of a multiplication (``docs/alignment.md``), so it runs on
        every core with the party's first blinding of its own ids, overlapped, as ``blind_batches``.

        Parameters
        ----------
        batches
            ``digest_id`` values, ``(n, 32)`` per batch.

        Returns
        -------
        tuple
            The points ``u(id)`` and their blinded values, each ``(n, 32)``, in order.

        Raises
        ------
        ValueError
            As ``to_curve`` (never in practice). Errors of the caller's iterator propagate as they are.
        """
        if self.workers == 1:
            key = X25519PrivateKey.from_private_bytes(self._key)
            done = [_hash_and_blind_bytes(key, batch.tobytes()) for batch in batches]
            count = sum(len(part) for part in done) // (2 * VALUE_BYTES)
        else:
            done, count = self._stream(batches, _worker_hash_and_blind, counterpart=False)
        self.multiplications += count
        points = b"".join(part[: len(part) // 2] for part in done)
        blinded = b"".join(part[len(part) // 2 :] for part in done)
        return as_values(points), as_values(blinded)

    def hash_batches(self, batches: Iterable[Values]) -> Values:
        """``to_curve`` over batches of digests, in the workers (no blinding: the key is not used).

        For a party that keeps its points to blind them more than once (a roster owner, once per pair).

        Raises
        ------
        ValueError
            As ``to_curve`` (never in practice). Errors of the caller's iterator propagate as they are.
        """
        if self.workers == 1:
            return as_values(b"".join(to_curve(batch.tobytes()) for batch in batches))
        done, _ = self._stream(batches, to_curve, counterpart=False)
        return as_values(b"".join(done))

    def _stream(
        self, batches: Iterable[Values], task: Callable[[bytes], bytes], *, counterpart: bool
    ) -> tuple[list[bytes], int]:
        pool = self._executor()
        pending: deque[Future[bytes]] = deque()
        done: list[bytes] = []
        count = 0
        for batch in batches:  # not inside a try: the caller's reading errors are its own, not a protocol's
            count += len(batch)
            step = self._task_rows(len(batch))
            for start in range(0, len(batch), step):
                if len(pending) >= _IN_FLIGHT * self.workers:
                    done.append(_result(pending.popleft(), counterpart))
                pending.append(pool.submit(task, batch[start : start + step].tobytes()))
        done.extend(_result(future, counterpart) for future in pending)
        return done, count

    def _blind_in_pool(self, values: Values, out: Values) -> None:
        pool = self._executor()
        rows = self._task_rows(len(values))
        pending: deque[tuple[int, Future[bytes]]] = deque()
        for start, chunk in self._chunks(values, rows):
            if len(pending) >= _IN_FLIGHT * self.workers:
                done_at, future = pending.popleft()
                out[done_at : done_at + rows] = as_values(future.result())
            pending.append((start, pool.submit(_worker_blind, chunk)))
        for done_at, future in pending:
            out[done_at : done_at + rows] = as_values(future.result())


def _result(future: Future[bytes], counterpart: bool) -> bytes:
    """A task's result; a ``ValueError`` from a counterpart's values is a ``ProtocolError``."""
    if not counterpart:
        return future.result()
    try:
        return future.result()
    except ValueError as err:
        raise ProtocolError(f"a value is not usable as an X25519 u-coordinate: {err}") from err


def sort_order(values: Values) -> npt.NDArray[np.intp]:
    """The permutation that sorts 32-byte rows bytewise."""
    return np.argsort(values.view(f"S{VALUE_BYTES}").ravel(), kind="stable")


def match(queries: Values, reference: Values) -> npt.NDArray[np.int64]:
    """For each row of ``queries``, the index of the equal row of ``reference``, or -1.

    Raises
    ------
    ProtocolError
        If ``reference`` holds a value twice (honest inputs never do: ids are unique per party).
    """
    ref = reference.view(f"S{VALUE_BYTES}").ravel()
    order = sort_order(reference)
    ordered = ref[order]
    if len(ordered) > 1 and bool(np.any(ordered[1:] == ordered[:-1])):
        raise ProtocolError("a list of blinded values repeats a value")
    if len(ordered) == 0:
        return np.full(len(queries), -1, dtype=np.int64)
    q = queries.view(f"S{VALUE_BYTES}").ravel()
    at = np.minimum(np.searchsorted(ordered, q), len(ordered) - 1)
    return np.where(ordered[at] == q, order[at], -1).astype(np.int64)
