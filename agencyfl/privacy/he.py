"""CKKS homomorphic encryption for eligibility scoring (TenSEAL).

Packing is column-wise: one ciphertext per model input holds that input for up to N/2 households,
so a logistic model is ``sum_j w_j * ct_j + b`` (scalar multiplications, one level, no Galois keys).
The requester keeps the secret key; the server is given a public context only and cannot decrypt.
Only parameter sets from ``PARAMETER_SETS`` (128-bit secure per the HE standard, SEAL-enforced) are
accepted. CKKS decryptions must never go back to the server (Li and Micciancio 2021: IND-CPA-D).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from agencyfl.federation.errors import HEError


@dataclass(frozen=True)
class ParameterSet:
    """A whitelisted CKKS parameter set and the multiplicative depth it supports."""

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    depth: int

    @property
    def slots(self) -> int:
        """Households per ciphertext."""
        return self.poly_modulus_degree // 2


# Total coefficient bits stay within the 128-bit-security bounds (N=4096: 109, N=8192: 218, N=16384: 438).
PARAMETER_SETS = (
    # additions only: screening's summed partial scores; scale 2^30 leaves room for values up to 2^23, so
    # the agencies' zero-sum masks (uniform on +-2^20 per pair) fit, with about 1e-6 of precision
    ParameterSet("n4096-d0", 4096, (54, 54), 30, 0),
    ParameterSet("n8192-d1", 8192, (60, 40, 60), 40, 1),
    ParameterSet("n8192-d2", 8192, (60, 40, 40, 60), 40, 2),
    ParameterSet("n8192-d3", 8192, (50, 35, 35, 35, 50), 35, 3),
    ParameterSet("n16384-d3", 16384, (60, 40, 40, 40, 60), 40, 3),
)


def parameter_set(name: str) -> ParameterSet:
    """The whitelisted set called ``name``."""
    for p in PARAMETER_SETS:
        if p.name == name:
            return p
    raise HEError(f"unknown parameter set {name!r} (known: {[p.name for p in PARAMETER_SETS]})")


def new_private_context(params: ParameterSet, relin_keys: bool = False) -> ts.Context:
    """A requester's context with its secret key (kept by the requester)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes)
    )
    ctx.global_scale = 2.0**params.scale_bits
    if relin_keys:
        ctx.generate_relin_keys()
    return ctx


def public_bytes(ctx: ts.Context) -> bytes:
    """The context without its secret key, as sent to the server (Galois keys only if generated)."""
    return bytes(
        ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=ctx.has_galois_keys(), save_relin_keys=True
        )
    )


def fingerprint(public_context: bytes) -> str:
    """SHA-256 of the serialized public context: names the key that ciphertexts are under."""
    return hashlib.sha256(public_context).hexdigest()


def _chain(ctx: ts.Context) -> tuple[int, int, int]:
    data = ctx.seal_context().data
    key = data.key_context_data()
    degree = int(key.parms().poly_modulus_degree())
    bits = int(key.total_coeff_modulus_bit_count())
    levels, node = 0, key
    while node is not None:
        levels += 1
        node = node.next_context_data()
    return degree, bits, levels


def load_public_context(raw: bytes, max_depth_needed: int) -> tuple[ts.Context, ParameterSet]:
    """Deserialize a requester's context on the server side and check it.

    Raises
    ------
    HEError
        Unreadable bytes, a secret key inside, parameters off the whitelist, or too shallow for the model.
    """
    try:
        ctx = ts.context_from(raw)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError from C++
        raise HEError(f"unreadable context ({exc.__class__.__name__})") from None
    if ctx.has_secret_key() or ctx.is_private():
        raise HEError("the context carries a secret key; send it with save_secret_key=False")
    if not ctx.has_public_key():
        raise HEError("the context has no public key")
    degree, bits, levels = _chain(ctx)
    for p in PARAMETER_SETS:
        if (
            p.poly_modulus_degree == degree
            and sum(p.coeff_mod_bit_sizes) == bits
            and len(p.coeff_mod_bit_sizes) == levels
        ):
            if p.depth < max_depth_needed:
                raise HEError(f"parameter set {p.name} has depth {p.depth}; this model needs {max_depth_needed}")
            if max_depth_needed > 1 and not ctx.has_relin_keys():
                raise HEError("this model needs relinearization keys in the context")
            return ctx, p
    raise HEError(f"parameters (N={degree}, {bits} coefficient bits, {levels} primes) are not on the whitelist")


def encrypt_columns(ctx: ts.Context, x: np.ndarray) -> list[bytes]:
    """One serialized ciphertext per column of ``x`` (rows = households, at most N/2)."""
    return [bytes(ts.ckks_vector(ctx, x[:, j].tolist()).serialize()) for j in range(x.shape[1])]


def decrypt_vector(ctx: ts.Context, raw: bytes, count: int) -> np.ndarray:
    """Decrypt a serialized result vector (requester side)."""
    return np.asarray(ts.ckks_vector_from(ctx, raw).decrypt()[:count], dtype=np.float64)


@dataclass(frozen=True)
class PlainModel:
    """Weights of a logistic model or a one-hidden-layer square-activation MLP, as numpy arrays."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def depth(self) -> int:
        """Multiplicative depth of the encrypted evaluation."""
        return 1 if len(self.layers) == 1 else 3

    def plaintext_logits(self, x: np.ndarray) -> np.ndarray:
        """Reference (unencrypted) evaluation."""
        h = x.astype(np.float64)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = h * h
        return np.asarray(h[:, 0])


def evaluate_row(ctx: ts.Context, model: PlainModel, row: bytes) -> ts.CKKSVector:
    """Score one household packed in one ciphertext: ``w . x + b`` by rotations (needs Galois keys).

    Raises
    ------
    HEError
        Not a logistic model, no Galois keys, or a malformed ciphertext.
    """
    if len(model.layers) != 1:
        raise HEError("row-packed scoring serves logistic models only")
    if not ctx.has_galois_keys():
        raise HEError("row-packed scoring needs Galois keys in the registered context")
    try:
        ct = ts.ckks_vector_from(ctx, row)
    except Exception as exc:
        raise HEError(f"malformed ciphertext ({exc.__class__.__name__})") from None
    w, b = model.layers[0]
    if ct.size() != w.shape[1]:
        raise HEError(f"the ciphertext holds {ct.size()} values; the model has {w.shape[1]} inputs")
    return ct.dot(w[0].tolist()) + float(b[0])


def evaluate_columns(ctx: ts.Context, model: PlainModel, columns: list[bytes]) -> ts.CKKSVector:
    """Evaluate ``model`` on column-packed ciphertexts under ``ctx`` (server side; no secret key).

    Raises
    ------
    HEError
        If a ciphertext cannot be read under this context.
    """
    try:
        cts = [ts.ckks_vector_from(ctx, c) for c in columns]
    except Exception as exc:
        raise HEError(f"malformed ciphertext ({exc.__class__.__name__})") from None
    h: list[ts.CKKSVector] = cts
    for i, (w, b) in enumerate(model.layers):
        out = []
        for k in range(w.shape[0]):
            acc = None
            for j, ct in enumerate(h):
                if w[k, j] == 0.0:
                    continue
                term = ct * float(w[k, j])
                acc = term if acc is None else acc + term
            if acc is None:
                acc = h[0] * 0.0
            acc = acc + float(b[k])
            if i < len(model.layers) - 1:
                acc = acc.square()
            out.append(acc)
        h = out
    return h[0]
