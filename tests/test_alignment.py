"""Private alignment (issue 15 items 3-5): DH-PSI over X25519, register alignment, the duplicate check.

Small sets, every party in this process; the ids come from a small generator local to this file
(valid GB 11643 numbers, with the formatting noise people write them with).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_core_ed25519_is_valid_point, crypto_sign_ed25519_pk_to_curve25519

from agencyfl.alignment import (
    AlignmentError,
    Blinder,
    DuplicateIdError,
    EmptyIntersectionError,
    Envelope,
    MessageRejectedError,
    ParameterMismatchError,
    PartyKeys,
    ProtocolError,
    RegisterAgency,
    RegisterHolder,
    Relay,
    align_register,
    blind,
    check_duplicates,
    conflicting_pairs,
    duplicate_check_multiplications,
    generate_key,
    hash_to_u,
    open_envelope,
    parameter_fingerprint,
    prepare_ids,
    register_multiplications,
    seal,
)
from agencyfl.alignment.inputs import prepare_and_blind
from agencyfl.alignment.psi import HASH, digest_id, edwards_to_u, to_curve
from agencyfl.alignment.relay import send_text, send_values
from agencyfl.federation.resident_id import check_character, normalize

SALT = b"federation-salt-for-tests"
AGENCIES = ("hrss", "tax", "environment")


def make_ids(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct valid resident ids."""
    out: set[str] = set()
    while len(out) < n:
        first = f"{rng.randrange(10**16, 10**17):017d}"
        out.add(first + check_character(first))
    return sorted(out, key=lambda _: rng.random())


def noisy(resident_id: str, rng: random.Random) -> str:
    """The same id as a person might write it: groups split by spaces or hyphens, full-width digits, a lower x."""
    text = resident_id.lower() if rng.random() < 0.5 else resident_id
    if rng.random() < 0.5:
        text = f"{text[:6]}{rng.choice([' ', '-', '　'])}{text[6:14]}{rng.choice([' ', '-'])}{text[14:]}"
    if rng.random() < 0.3:
        text = "".join(chr(ord(c) - ord("0") + 0xFF10) if c.isdigit() else c for c in text)
    return text


def bad_check(resident_id: str) -> str:
    """The id with a wrong check character."""
    return resident_id[:17] + ("0" if resident_id[17] != "0" else "1")


def population(seed: int = 0, n: int = 240) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """A register, each agency's rows (noisy, some not registered), and each agency's true ids per row."""
    rng = random.Random(seed)
    register = make_ids(rng, n)
    outsiders = make_ids(random.Random(seed + 100), 60)
    rows: dict[str, list[str]] = {}
    truth: dict[str, list[str]] = {}
    for i, agency in enumerate(AGENCIES):
        ids = rng.sample(register, n // (i + 2)) + outsiders[i * 20 : (i + 1) * 20]
        rng.shuffle(ids)
        truth[agency] = ids
        rows[agency] = [noisy(x, rng) for x in ids]
    return register, rows, truth


# --- blinding -------------------------------------------------------------------------------------------


def test_blinding_commutes_on_a_fixed_id() -> None:
    a, b = generate_key(), generate_key()
    u = hash_to_u(SALT, "11010519491231002X")
    assert blind(a, blind(b, u)) == blind(b, blind(a, u))
    assert blind(a, u) != blind(b, u) != u


@settings(max_examples=60, deadline=None)
@given(
    first=st.integers(10**16, 10**17 - 1), a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32)
)
def test_blinding_commutes_for_random_ids_and_keys(first: int, a: bytes, b: bytes) -> None:
    digits = f"{first:017d}"
    u = hash_to_u(SALT, digits + check_character(digits))
    assert blind(a, blind(b, u)) == blind(b, blind(a, u))


@settings(max_examples=60, deadline=None)
@given(first=st.integers(10**16, 10**17 - 1), seed=st.integers(0, 2**32))
def test_every_way_of_writing_an_id_hashes_alike(first: int, seed: int) -> None:
    digits = f"{first:017d}"
    resident_id = digits + check_character(digits)
    written = [resident_id, noisy(resident_id, random.Random(seed)), noisy(resident_id, random.Random(seed + 1))]
    hashes = {prepare_ids([w], SALT, party="p").hashes.tobytes() for w in written}
    assert hashes == {hash_to_u(SALT, resident_id)}


def test_the_worker_pool_blinds_exactly_as_one_process_does() -> None:
    values = prepare_ids(make_ids(random.Random(9), 1500), SALT, party="p").hashes  # over the in-process limit
    key = generate_key()
    with Blinder(key, workers=2, batch_size=64) as pool, Blinder(key, workers=1) as inline:
        pooled, single = pool.blind(values), inline.blind(values)
        streamed = pool.blind_batches(iter([values[:700], values[700:701], values[701:]]))
    assert np.array_equal(pooled, single)
    assert np.array_equal(streamed, single)
    assert single[1499].tobytes() == blind(key, values[1499].tobytes())
    assert pool.multiplications == 2 * inline.multiplications == 3000


def test_all_cores_give_the_same_alignment_as_one() -> None:
    register, rows, _ = population(seed=15, n=120)
    keys = {name: generate_key() for name in ("civil-affairs", *AGENCIES)}
    one = align_register(register, rows, salt=SALT, workers=1, blinding_keys=keys)
    two = align_register(register, rows, salt=SALT, workers=2, batch_size=32, blinding_keys=keys)
    for agency in AGENCIES:
        assert np.array_equal(one.agencies[agency].positions, two.agencies[agency].positions)


# --- the hash into the group: an independent oracle in plain Python ints ------------------------------

P = 2**255 - 19
A = 486662
ORDER = 2**252 + 27742317777372353535851937790883648493  # the prime order of the main subgroup (RFC 7748)


def on_curve(u: bytes) -> bool:
    """Whether ``u`` is the u-coordinate of a point of Curve25519 (not of its twist): the Legendre symbol."""
    x = int.from_bytes(u, "little") & ((1 << 255) - 1)  # RFC 7748 ignores the top bit
    return pow((x**3 + A * x * x + x) % P, (P - 1) // 2, P) == 1


def ladder(k: int, u: bytes) -> tuple[int, int]:
    """``[k]u`` in projective (X, Z) by the RFC 7748 Montgomery ladder, unclamped: Z == 0 is the neutral point."""
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3 = 1, 0, x1, 1
    for t in reversed(range(k.bit_length())):
        if (k >> t) & 1:
            x2, x3, z2, z3 = x3, x2, z3, z2
        a, b, c, d = (x2 + z2) % P, (x2 - z2) % P, (x3 + z3) % P, (x3 - z3) % P
        da, cb, aa, bb = d * a % P, c * b % P, a * a % P, b * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        e = (aa - bb) % P
        x2, z2 = aa * bb % P, e * (aa + (A - 2) // 4 * e) % P
        if (k >> t) & 1:
            x2, x3, z2, z3 = x3, x2, z3, z2
    return x2, z2


def test_the_former_hash_leaks_a_twist_bit_that_blinding_keeps() -> None:
    # The leak F2 of the review: SHA-256 used as a u-coordinate is on the twist about half the time, and
    # X25519 keeps the side, so each blinded value shows one bit of the id's hash to anyone.
    ids = make_ids(random.Random(21), 400)
    old = [hashlib.sha256(SALT + resident_id.encode()).digest() for resident_id in ids]
    key = generate_key()
    sides = [on_curve(u) for u in old]
    assert 0.4 < sides.count(False) / len(sides) < 0.6
    assert [on_curve(blind(key, u)) for u in old] == sides


def test_the_hash_puts_every_hashed_and_blinded_value_on_the_curve() -> None:
    ids = make_ids(random.Random(21), 400)
    points = prepare_ids(ids, SALT, party="p").hashes
    a, b = generate_key(), generate_key()
    with Blinder(a, workers=1) as blinder:
        once = blinder.blind(points)
    twice = [blind(b, v.tobytes()) for v in once]
    assert all(on_curve(u.tobytes()) for u in points)
    assert all(on_curve(v.tobytes()) for v in once)
    assert all(on_curve(v) for v in twice)


def test_the_hash_lands_in_the_prime_order_subgroup() -> None:
    def in_subgroup(u: bytes) -> bool:
        x, z = ladder(ORDER, u)
        return z == 0 and x != 0  # [order] u is the neutral point: u has the prime order

    ids = make_ids(random.Random(22), 32)
    assert all(in_subgroup(hash_to_u(SALT, resident_id)) for resident_id in ids)
    # A raw 32-byte u is in it with probability about 1/16 (1/8 of the curve, none of the twist).
    raw = [hashlib.sha256(SALT + resident_id.encode()).digest() for resident_id in ids]
    assert sum(in_subgroup(u) for u in raw) < len(raw) // 4


def test_the_batch_conversion_is_libsodiums_and_refuses_the_neutral_point() -> None:
    digests = b"".join(digest_id(SALT, x) for x in make_ids(random.Random(23), 300))
    from nacl.bindings import crypto_core_ed25519_from_uniform

    edwards = [crypto_core_ed25519_from_uniform(digests[i : i + 32]) for i in range(0, len(digests), 32)]
    assert all(crypto_core_ed25519_is_valid_point(p) for p in edwards)  # libsodium: on the main subgroup
    assert to_curve(digests) == b"".join(crypto_sign_ed25519_pk_to_curve25519(p) for p in edwards)
    assert edwards_to_u(edwards[0]) == crypto_sign_ed25519_pk_to_curve25519(edwards[0])
    assert edwards_to_u(b"") == b""
    neutral = (1).to_bytes(32, "little")
    with pytest.raises(ValueError, match="neutral"):
        edwards_to_u(edwards[0] + neutral)


def test_the_fingerprint_names_the_new_hash() -> None:
    digest = hashlib.sha256(b"agencyfl/alignment/v1")
    for part in (SALT, b"GB11643-1999", b"X25519", b"sha256-elligator2-ed25519-to-x25519"):
        digest.update(len(part).to_bytes(8, "big") + part)
    assert HASH == "sha256-elligator2-ed25519-to-x25519"
    assert parameter_fingerprint(SALT) == digest.hexdigest()
    assert parameter_fingerprint(SALT) != _fingerprint_with_hash(b"SHA-256")


def _fingerprint_with_hash(name: bytes) -> str:
    digest = hashlib.sha256(b"agencyfl/alignment/v1")
    for part in (SALT, b"GB11643-1999", b"X25519", name):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def test_the_workers_hash_and_blind_exactly_as_one_process_does() -> None:
    ids = make_ids(random.Random(24), 1500)
    key = generate_key()
    with Blinder(key, workers=2, batch_size=64) as pool, Blinder(key, workers=1) as inline:
        pooled, pooled_blinded = prepare_and_blind(ids, SALT, pool, party="p", batch_size=700)
        single, single_blinded = prepare_and_blind(ids, SALT, inline, party="p")
    with Blinder(generate_key(), workers=2, batch_size=64) as hasher:
        hashed = prepare_ids(ids, SALT, party="p", batch_size=700, pool=hasher)
    assert np.array_equal(pooled.hashes, prepare_ids(ids, SALT, party="p").hashes)
    assert np.array_equal(hashed.hashes, pooled.hashes) and np.array_equal(hashed.rows, pooled.rows)
    assert np.array_equal(pooled.hashes, single.hashes) and np.array_equal(pooled_blinded, single_blinded)
    assert pooled.hashes[1499].tobytes() == hash_to_u(SALT, ids[1499])
    assert single_blinded[1499].tobytes() == blind(key, hash_to_u(SALT, ids[1499]))
    assert pool.multiplications == inline.multiplications == 1500


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_reading_own_ids_propagates_and_is_no_protocol_error(workers: int) -> None:
    def unreadable() -> Iterator[str]:
        yield from make_ids(random.Random(25), 1200)
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    for stream in (
        lambda blinder: prepare_and_blind(unreadable(), SALT, blinder, party="p", batch_size=500),
        lambda blinder: blinder.blind_batches(as_batches(unreadable())),
    ):
        with Blinder(generate_key(), workers=workers) as blinder, pytest.raises(UnicodeDecodeError):
            stream(blinder)


def as_batches(ids: Iterator[str]) -> Iterator[np.ndarray]:
    """The ids' points in batches of 500, as a caller streaming its own input would pass them."""
    batch: list[str] = []
    for resident_id in ids:
        batch.append(resident_id)
        if len(batch) == 500:
            yield prepare_ids(batch, SALT, party="p").hashes
            batch = []


def test_a_small_order_point_is_refused() -> None:
    with pytest.raises(ProtocolError, match="u-coordinate"):
        blind(generate_key(), bytes(32))
    with Blinder(generate_key(), workers=1) as blinder, pytest.raises(ProtocolError):
        blinder.blind(np.zeros((3, 32), dtype=np.uint8))


# --- register alignment ---------------------------------------------------------------------------------


def test_three_agencies_get_exactly_the_true_register_positions() -> None:
    register, rows, truth = population()
    result = align_register(register, rows, salt=SALT, workers=1, batch_size=32)
    where = {resident_id: i for i, resident_id in enumerate(register)}
    for agency in AGENCIES:
        got = result.agencies[agency]
        expected = np.array([where.get(resident_id, -1) for resident_id in truth[agency]])
        assert np.array_equal(got.rows, np.arange(len(truth[agency])))
        assert np.array_equal(got.positions, expected)
        assert got.matched == int(np.count_nonzero(expected >= 0)) > 0
        assert got.register_size == len(register)
    sizes = {a: len(truth[a]) for a in AGENCIES}
    assert result.multiplications == register_multiplications(len(register), sizes.values())


def test_each_agency_output_holds_only_its_rows_and_positions(tmp_path: Path) -> None:
    register, rows, truth = population(seed=1)
    result = align_register(register, rows, salt=SALT, workers=1)
    for agency in AGENCIES:
        path = result.agencies[agency].write(tmp_path / agency)
        lines = path.read_text().splitlines()
        assert lines[0] == "row,position"
        pairs = [tuple(map(int, line.split(","))) for line in lines[1:]]
        assert len(pairs) == result.agencies[agency].matched
        assert all(0 <= row < len(truth[agency]) and 0 <= pos < len(register) for row, pos in pairs)
        assert all(register[pos] == truth[agency][row] for row, pos in pairs)
        text = path.read_text()
        assert not re.search(r"\d{17}[\dXx]", text), "an id in an agency's output"
        assert (tmp_path / agency / "alignment-quarantine.csv").read_text() == "row,reason\n"


def test_civil_affairs_learns_sizes_only(tmp_path: Path) -> None:
    register, rows, truth = population(seed=2)
    holder_keys, keys = PartyKeys.generate("civil-affairs"), {a: PartyKeys.generate(a) for a in AGENCIES}
    directory = {k.name: k.public() for k in [holder_keys, *keys.values()]}
    relay = Relay()
    with RegisterHolder(holder_keys, directory, salt=SALT, run="r1", workers=1) as holder:
        agencies = {
            a: RegisterAgency(keys[a], directory, register="civil-affairs", salt=SALT, run="r1", workers=1)
            for a in AGENCIES
        }
        holder.send_parameters(relay, AGENCIES)
        for agency in agencies.values():
            agency.send_parameters(relay, ["civil-affairs"])
            agency.check_parameters(relay, ["civil-affairs"])
        holder.check_parameters(relay, AGENCIES)
        holder.send_register(relay, register, AGENCIES)
        for name, agency in agencies.items():
            agency.send_rows(relay, rows[name])
            assert holder.answer(relay, name) == len(truth[name])
        for agency in agencies.values():
            agency.finish(relay)
        view = holder.view()
        written = holder.write(tmp_path).read_text()
    assert view.model_dump() == {
        "holder": "civil-affairs",
        "register_size": len(register),
        "quarantined": 0,
        "query_sizes": {a: len(truth[a]) for a in AGENCIES},
    }
    assert not re.search(r"\d{17}", written)
    assert {r.counterpart: r.matched for r in holder.records()} == dict.fromkeys(AGENCIES)


def test_the_relay_sees_no_id_and_no_blinded_value() -> None:
    register, rows, truth = population(seed=3, n=120)
    keys = {name: generate_key() for name in ("civil-affairs", *AGENCIES)}
    relay = Relay(keep_transcript=True)
    align_register(register, rows, salt=SALT, transport=relay, workers=1, batch_size=16, blinding_keys=keys)
    transcript = relay.transcript()
    r = keys["civil-affairs"]
    secrets_: list[bytes] = []
    for agency in AGENCIES:
        a = keys[agency]
        for raw, resident_id in zip(rows[agency], truth[agency], strict=True):
            u = hash_to_u(SALT, resident_id)
            secrets_ += [raw.encode(), resident_id.encode(), resident_id[:17].encode(), u]
            secrets_ += [blind(a, u), blind(r, u), blind(a, blind(r, u))]
    for resident_id in register:
        secrets_ += [resident_id.encode(), hash_to_u(SALT, resident_id), blind(r, hash_to_u(SALT, resident_id))]
    assert len(transcript) > 32 * (3 * len(register) + 2 * sum(map(len, truth.values())))
    found = [s for s in secrets_ if s in transcript]
    assert found == []
    assert {rec.kind for rec in relay.records} == {"parameters", "register", "query", "response"}
    assert sum(rec.size for rec in relay.records) == relay.bytes_sent()


class FlipOneByte(Relay):
    """A coordinator that alters one ciphertext byte of the first chunk of one kind of message."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def post(self, envelope: Envelope) -> None:
        if envelope.kind == self.kind and envelope.chunk == 0:
            altered = bytearray(envelope.ciphertext)
            altered[len(altered) // 2] ^= 0x01
            envelope = envelope.model_copy(update={"ciphertext": bytes(altered)})
        super().post(envelope)


class DropLastChunk(Relay):
    def post(self, envelope: Envelope) -> None:
        if not (envelope.kind == "register" and envelope.chunk == envelope.chunks - 1):
            super().post(envelope)


@pytest.mark.parametrize("kind", ["register", "query", "response", "parameters"])
def test_a_tampered_ciphertext_is_refused(kind: str) -> None:
    register, rows, _ = population(seed=4, n=60)
    with pytest.raises(MessageRejectedError, match="signature does not verify"):
        align_register(register, rows, salt=SALT, transport=FlipOneByte(kind), workers=1)


def test_a_dropped_chunk_is_refused() -> None:
    register, rows, _ = population(seed=4, n=60)
    with pytest.raises(MessageRejectedError, match="chunks missing"):
        align_register(register, rows, salt=SALT, transport=DropLastChunk(), workers=1, batch_size=8)


def test_an_envelope_opens_only_for_its_recipient_run_and_kind() -> None:
    alice, bob, eve = (PartyKeys.generate(n) for n in ("alice", "bob", "eve"))
    envelope = seal(b"x" * 64, run="r1", sender=alice, recipient=bob.public(), kind="query", rows=2)
    assert open_envelope(envelope, recipient=bob, sender=alice.public(), run="r1", kind="query") == b"x" * 64
    with pytest.raises(MessageRejectedError):
        open_envelope(envelope, recipient=bob, sender=alice.public(), run="r2", kind="query")
    with pytest.raises(MessageRejectedError):
        open_envelope(envelope, recipient=bob, sender=alice.public(), run="r1", kind="response")
    redirected = envelope.model_copy(update={"recipient": "eve"})
    with pytest.raises(MessageRejectedError, match="signature"):
        open_envelope(redirected, recipient=eve, sender=alice.public(), run="r1", kind="query")
    resigned = envelope.model_copy(update={"sender": "eve", "signature": eve.sign(b"anything")})
    with pytest.raises(MessageRejectedError, match="signature"):
        open_envelope(resigned, recipient=bob, sender=eve.public(), run="r1", kind="query")
    assert "secret" in repr(alice) and "PRIVATE" not in repr(alice)


def test_a_bad_check_character_is_quarantined_with_the_reason() -> None:
    register, rows, truth = population(seed=5)
    rows["tax"].insert(3, bad_check(truth["tax"][0]))
    register_with_bad = [*register[:10], "not-an-id", *register[10:]]
    result = align_register(register_with_bad, rows, salt=SALT, workers=1)
    tax = result.agencies["tax"]
    assert [q.row for q in tax.quarantine] == [3]
    assert "check character" in tax.quarantine[0].reason
    assert 3 not in tax.rows
    assert result.view.quarantined == 1 and result.view.register_size == len(register)
    assert result.view.query_sizes["tax"] == len(truth["tax"])
    where = {resident_id: i for i, resident_id in enumerate(register)}  # positions count valid entries only
    assert all(where[truth["tax"][r - (r > 3)]] == p for r, p in zip(tax.rows, tax.positions, strict=True) if p >= 0)


def test_a_duplicate_id_in_one_party_is_an_error_and_nothing_is_sent() -> None:
    register, rows, truth = population(seed=6)
    rows["hrss"].append(noisy(truth["hrss"][4], random.Random(1)).replace(" ", "-"))
    relay = Relay()
    with pytest.raises(DuplicateIdError, match=rf"hrss: 1 duplicate .*rows 4 and {len(truth['hrss'])}"):
        align_register(register, rows, salt=SALT, transport=relay, workers=1)
    assert not [r for r in relay.records if r.sender == "hrss" and r.kind != "parameters"]
    with pytest.raises(DuplicateIdError, match="civil-affairs"):
        align_register([*register, register[0]], rows, salt=SALT, workers=1)


def test_an_empty_intersection_is_an_error() -> None:
    register = make_ids(random.Random(7), 50)
    others = make_ids(random.Random(8), 30)
    with pytest.raises(EmptyIntersectionError, match="none of hrss's 30 rows"):
        align_register(register, {"hrss": others}, salt=SALT, workers=1)


def test_mismatched_parameters_stop_before_any_id_is_read() -> None:
    register, rows, _ = population(seed=9, n=40)
    consumed: list[str] = []

    def watched(ids: list[str]) -> Iterator[str]:
        for x in ids:
            consumed.append(x)
            yield x

    r_keys, a_keys = PartyKeys.generate("civil-affairs"), PartyKeys.generate("hrss")
    directory = {k.name: k.public() for k in (r_keys, a_keys)}
    relay = Relay()
    holder = RegisterHolder(r_keys, directory, salt=SALT, run="r", workers=1)
    agency = RegisterAgency(a_keys, directory, register="civil-affairs", salt=b"another salt", run="r", workers=1)
    holder.send_parameters(relay, ["hrss"])
    agency.send_parameters(relay, ["civil-affairs"])
    with pytest.raises(ParameterMismatchError, match="different alignment parameters"):
        holder.check_parameters(relay, ["hrss"])
    with pytest.raises(ParameterMismatchError, match="not yet compared"):
        holder.send_register(relay, watched(register), ["hrss"])
    with pytest.raises(ParameterMismatchError):
        agency.check_parameters(relay, ["civil-affairs"])
    with pytest.raises(ParameterMismatchError, match="not yet compared"):
        agency.send_rows(relay, watched(rows["hrss"]))
    assert consumed == []
    assert {r.kind for r in relay.records} == {"parameters"}
    assert holder.multiplications == agency.multiplications == 0


def test_a_lying_agency_learns_only_positions_of_the_ids_it_blinded() -> None:
    rng = random.Random(10)
    register = make_ids(rng, 200)
    guesses = rng.sample(register, 15) + make_ids(random.Random(11), 15)  # 15 right guesses, 15 wrong
    result = align_register(register, {"curious": guesses}, salt=SALT, workers=1)
    learned = result.agencies["curious"]
    hits = learned.positions[learned.positions >= 0]
    assert sorted(hits.tolist()) == sorted(register.index(g) for g in guesses[:15])
    assert result.view.query_sizes == {"curious": 30}  # every guess shows in what R sees
    with pytest.raises(ProtocolError, match="more than the 20 allowed"):
        align_register(register, {"curious": guesses}, salt=SALT, workers=1, max_rows={"curious": 20})


def test_a_small_order_point_from_an_agency_is_refused_and_blamed_on_it() -> None:
    r_keys, a_keys = PartyKeys.generate("civil-affairs"), PartyKeys.generate("hrss")
    directory = {k.name: k.public() for k in (r_keys, a_keys)}
    relay = Relay()
    with RegisterHolder(r_keys, directory, salt=SALT, run="r", workers=1) as holder:
        holder.send_parameters(relay, ["hrss"])
        send_text(
            relay,
            parameter_fingerprint(SALT),
            run="r",
            sender=a_keys,
            recipient=directory["civil-affairs"],
            kind="parameters",
        )
        holder.check_parameters(relay, ["hrss"])
        send_values(
            relay,
            np.zeros((2, 32), dtype=np.uint8),
            run="r",
            sender=a_keys,
            recipient=directory["civil-affairs"],
            kind="query",
        )
        with pytest.raises(ProtocolError, match="the query from hrss"):
            holder.answer(relay, "hrss")
    assert not [r for r in relay.records if r.kind == "response"]


# --- duplicate check ------------------------------------------------------------------------------------


def rosters(seed: int = 12) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, set[tuple[int, str]]]]:
    """Four rosters with planted duplicates (written differently), and each owner's expected review list."""
    rng = random.Random(seed)
    pool = make_ids(rng, 600)
    members = {"dibao-east": pool[0:100], "dibao-west": pool[100:200], "tekun": pool[200:300], "linshi": pool[300:400]}
    planted = {
        ("dibao-east", "dibao-west"): pool[400:412],  # same programme
        ("dibao-west", "tekun"): pool[412:420],  # exclusive programmes
        ("dibao-east", "linshi"): pool[420:430],  # not in conflict: must not be reported
    }
    for (x, y), ids in planted.items():
        members[x] = [*members[x], *ids]
        members[y] = [*ids, *members[y]]
    written = {name: [noisy(i, rng) for i in ids] for name, ids in members.items()}
    expected: dict[str, set[tuple[int, str]]] = {name: set() for name in members}
    for x, y in list(planted)[:2]:
        for resident_id in planted[(x, y)]:
            expected[x].add((members[x].index(resident_id), y))
            expected[y].add((members[y].index(resident_id), x))
    return members, written, expected


PROGRAMMES = {"dibao-east": "dibao", "dibao-west": "dibao", "tekun": "tekun", "linshi": "linshi"}


def test_the_duplicate_check_finds_planted_duplicates_and_nothing_else() -> None:
    members, written, expected = rosters()
    result = check_duplicates(written, PROGRAMMES, salt=SALT, exclusive=[("dibao", "tekun")], workers=1, batch_size=32)
    assert result.pairs == (("dibao-east", "dibao-west"), ("dibao-east", "tekun"), ("dibao-west", "tekun"))
    for owner, items in result.review.items():
        assert {(item.row, item.other_roster) for item in items} == expected[owner]
        assert all(item.other_programme == PROGRAMMES[item.other_roster] for item in items)
    assert result.review["linshi"] == ()
    matched = {(r.party, r.counterpart): r.matched for r in result.records}
    assert matched == {
        ("dibao-east", "dibao-west"): 12,
        ("dibao-west", "dibao-east"): 12,
        ("dibao-east", "tekun"): 0,
        ("tekun", "dibao-east"): 0,
        ("dibao-west", "tekun"): 8,
        ("tekun", "dibao-west"): 8,
    }
    assert all(r.purpose == "duplicate-check" for r in result.records)
    sizes = {name: len(ids) for name, ids in members.items()}
    assert result.multiplications == duplicate_check_multiplications(sizes, result.pairs)


def test_each_roster_owner_sees_only_its_own_households() -> None:
    members, written, _ = rosters(seed=13)
    relay = Relay(keep_transcript=True)
    result = check_duplicates(written, PROGRAMMES, salt=SALT, exclusive=[("dibao", "tekun")], transport=relay)
    for owner, items in result.review.items():
        assert all(0 <= item.row < len(members[owner]) for item in items)
        assert not any(isinstance(v, str) and re.search(r"\d{17}", v) for i in items for v in i.model_dump().values())
    transcript = relay.transcript()
    assert not [x for ids in members.values() for x in ids if x.encode() in transcript]
    assert not [x for ids in members.values() for x in ids if hash_to_u(SALT, x) in transcript]


def test_duplicate_check_quarantine_and_configuration_errors() -> None:
    _, written, _ = rosters(seed=14)
    written["tekun"].insert(0, bad_check(normalize(written["tekun"][0])))
    result = check_duplicates(written, PROGRAMMES, salt=SALT, exclusive=[("dibao", "tekun")], workers=1)
    assert [q.row for q in result.quarantine["tekun"]] == [0]
    assert all(item.row != 0 for item in result.review["tekun"])
    with pytest.raises(AlignmentError, match="'tekunn'"):
        conflicting_pairs(PROGRAMMES, [("dibao", "tekunn")])
    written["dibao-west"].append(written["dibao-west"][0])
    with pytest.raises(DuplicateIdError, match="dibao-west"):
        check_duplicates(written, PROGRAMMES, salt=SALT, workers=1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="0123456789", min_size=17, max_size=17).map(lambda d: d + check_character(d)),
            st.text(alphabet="0123456789", min_size=17, max_size=17).map(lambda d: (d + check_character(d)).lower()),
            st.text(alphabet="0123456789Xx -１２", min_size=0, max_size=22),
        ),
        max_size=40,
    )
)
def test_ids_checked_together_are_those_checked_one_by_one(raws: list[str]) -> None:
    from agencyfl.federation.resident_id import InvalidResidentId, canonical_or_none

    def one(raw: str) -> str | None:
        try:
            return normalize(raw)
        except InvalidResidentId:
            return None

    assert canonical_or_none(raws) == [one(r) for r in raws]
