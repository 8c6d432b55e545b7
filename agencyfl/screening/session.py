"""One party's side of a screening in a deployment, answering the coordinator's frames on its stream.

Civil affairs (the requester) draws the screening's CKKS key, decrypts only the summed scores, decides
the lists with the model card's rule and writes the worklists in its own folder
(``HOME/screenings/ID/``); each agency scores its own block with its own part (checked against the
plan's hash) under the requester's public key, and discloses reasons only as its own spec allows, each
use recorded in its own uses ledger first (``docs/screening.md``, "In a deployment").
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys, certify, pack, unpack, verify_certificate
from agencyfl.federation.errors import MessageRejectedError, ModelError, ProtocolError, ScreeningRefusedError
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.he import fingerprint
from agencyfl.privacy.ledger import Ledger
from agencyfl.screening.outcomes import latest_outcomes
from agencyfl.screening.protocol import (
    Contributor,
    PartialScores,
    Requester,
    ScreeningRequest,
    context_statement,
    open_reasons,
    partial_statement,
    reasons_capacity,
    seal_positions,
    seal_reasons,
    verify_statement,
    zero_sum_mask,
)
from agencyfl.screening.records import ModelUse, now_iso
from agencyfl.screening.remote import ScreeningPlan
from agencyfl.screening.run import (
    Lists,
    add_reasons,
    answer_disclosure,
    decide_lists,
    screening_report,
    worklist_rows,
    write_worklists,
)
from agencyfl.vertical.encoding import Block, PartyFiles, feature_block, register_block, register_frame
from agencyfl.vertical.model import RegisteredVerticalModel
from agencyfl.vertical.stream import Frame, dispatch, int_field, list_field, str_field

MODEL_FILES = ("manifest.json", "card.json", "spec.toml")


@dataclass
class ScreeningConfig:
    """What a party needs: who it is, its own spec and files, its keys, its uses ledger, its peers' keys."""

    agency: str
    loaded: LoadedVerticalSpec
    plan: ScreeningPlan
    files: PartyFiles  # its data file and its folder (alignment/, model/, screenings/)
    uses: Ledger[ModelUse]  # its own uses ledger
    ledger_key: Ed25519PrivateKey
    peer_keys: dict[str, Ed25519PublicKey]


class ScreeningSession:
    """This party's role in one screening."""

    # each operation once per screening: a coordinator cannot ask for a second decryption, list or disclosure
    once_only = frozenset({"setup", "screen-request", "screen-scores", "screen-finish", "screen-partial",
                           "screen-explain"})  # fmt: skip

    def __init__(self, config: ScreeningConfig) -> None:
        self.config = config
        self.agency, self.loaded, self.plan = config.agency, config.loaded, config.plan
        self.is_requester = self.agency == self.plan.requester
        self.keys = PartyKeys.generate(self.agency)
        self.certificate = certify(self.plan.screening, self.keys.public(), config.ledger_key)
        self.out = config.files.folder / "screenings" / self.plan.screening
        self.block: Block = (
            register_block(self.loaded, config.files.folder, files=config.files)
            if self.is_requester
            else feature_block(
                self.loaded, self.agency, config.files.folder, files=config.files, size=self.plan.register_size
            )  # fmt: skip
        )
        if len(self.block.x) != self.plan.register_size:
            raise ProtocolError(f"the plan's register has {self.plan.register_size} households; this one has "
                                f"{len(self.block.x)}")  # fmt: skip
        self.weights = self._own_part()
        self.directory: dict[str, PartyPublicKeys] = {self.agency: self.keys.public()}
        self.requester: Requester | None = None
        self.request: ScreeningRequest | None = None
        self.asked: set[str] = set()  # the agencies civil affairs sent a list to
        self.contributor: Contributor | None = None
        self.model: RegisteredVerticalModel | None = None
        self.lists: Lists | None = None
        self.sent = 0

    def _own_part(self) -> np.ndarray:
        """Its part of the model, from its own folder, only if its SHA-256 is the plan's (ModelError if not)."""
        version = self.plan.model_version.rsplit("/", 1)[-1]
        path = self.config.files.folder / "model" / version / "weights.npy"
        try:
            weights = np.load(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.agency} holds no part of {self.plan.model_version} ({exc})") from None
        digest = hashlib.sha256(np.ascontiguousarray(weights, dtype="<f8").tobytes()).hexdigest()
        if digest != self.plan.parts.get(self.agency):
            raise ModelError(f"{self.agency}'s part of {self.plan.model_version} does not match the model's manifest")
        return np.asarray(weights, dtype=np.float64)

    def hello_fields(self) -> dict[str, Any]:
        """What the hello says besides the signature."""
        return {"agency": self.agency, "job": self.plan.screening, "checkpoint": 0}

    def handle(self, frame: Frame) -> Frame:
        """Answer one of the coordinator's frames."""
        return dispatch(self, self.agency, frame)

    def _use(self, kind: str, **fields: Any) -> str:
        spec = self.loaded.spec
        return self.config.uses.append(ModelUse(
            kind=kind, owner=self.agency, screening=self.plan.screening, federation=spec.federation.name,  # type: ignore[arg-type]
            model_version=self.plan.model_version, purpose=self.plan.purpose, requester=self.plan.requester,
            time=now_iso(), **fields,
        ))  # fmt: skip

    # ------------------------------------------------------------------ both roles
    def _op_setup(self, frame: Frame) -> Frame:
        names = frame.fields.get("certificates")
        if not isinstance(names, list) or len(frame.blobs) != len(names) + 1:
            raise MessageRejectedError("a malformed setup frame")
        certificates = dict(zip(names, frame.blobs[1:], strict=True))
        # civil affairs checks every agency's partial scores, each agency civil affairs' key and its peers'
        # (their zero-sum masks): every party needs the others' ledger keys (handed out of band), or the
        # coordinator could stand in for one of them
        for peer in (p for p in self.plan.parties if p != self.agency):
            trusted = self.config.peer_keys.get(peer)
            if trusted is None:
                raise MessageRejectedError(
                    f"{self.agency} holds no ledger key for {peer}: its steward must start with "
                    f"`--peer-key {peer}=LEDGER.pub` to screen with it"
                )
            if peer not in certificates:
                raise MessageRejectedError(f"the coordinator forwarded no run keys of {peer}")
            self.directory[peer] = verify_certificate(self.plan.screening, peer, certificates[peer], trusted)
        return Frame("ok")

    # ------------------------------------------------------------------ the requester (civil affairs)
    def _op_screen_request(self, frame: Frame) -> Frame:
        if not self.is_requester or len(frame.blobs) != len(MODEL_FILES):
            raise MessageRejectedError(f"{self.agency} takes no screening request of this shape")
        folder = self.out / "model"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, blob in zip(MODEL_FILES, frame.blobs, strict=True):
            (folder / name).write_bytes(blob)
        model = RegisteredVerticalModel(folder)
        parts = {p: part.sha256 for p, part in model.manifest.parts.items()}
        if (
            model.manifest.sha256() != self.plan.model_sha256
            or model.loaded.sha256 != self.loaded.sha256
            or parts != self.plan.parts
        ):
            raise ModelError("the model's manifest, parts or spec are not the one the signed plan names")
        self.model = model
        self.requester = Requester(self.block, self.weights)
        request = self.requester.request(self.plan.screening, self.plan.federation, self.plan.model_version,
                                         self.plan.purpose)  # fmt: skip
        self.request = request
        self.sent += len(request.public_context)
        statement = context_statement(self.plan.screening, self.agency, request.register_size,
                                      request.context_fingerprint)  # fmt: skip
        fields = {"register_size": request.register_size, "fingerprint": request.context_fingerprint,
                  "signature": self.keys.sign(statement).hex()}  # fmt: skip
        return Frame("ok", fields, [request.public_context])

    def _op_screen_scores(self, frame: Frame) -> Frame:
        if self.requester is None or self.model is None or self.request is None:
            raise ProtocolError(f"{self.agency}: scores before the screening request")
        logits = self.requester.logits_of(self.request, self._signed_partials(frame))
        files = self.config.files
        registered = register_frame(self.loaded, files.folder, canonical=False, files=files)
        self.lists = decide_lists(self.loaded, self.model, logits, registered, self.plan.review_band)
        positions = self.lists.listed.tolist()
        asked: list[bytes] = []
        for agency in self.plan.parties[1:]:  # one list for each agency that explains, even an empty one
            if self.loaded.spec.agency(agency).explain == "none":
                continue
            size = self.plan.register_size
            asked.append(pack(seal_positions(self.keys, self.directory[agency], self.plan.screening, positions, size)))
            self.asked.add(agency)
        self.sent += sum(map(len, asked))
        return Frame("ok", blobs=asked)  # no count: how many are listed stays with civil affairs

    def _signed_partials(self, frame: Frame) -> list[PartialScores]:
        """Each agency's partial scores as it signed them: one per agency with a part, none altered."""
        senders, counts = list_field(frame, "senders", str), list_field(frame, "chunks", int)
        signatures = list_field(frame, "signatures", str)
        agencies = sorted(self.plan.parts.keys() - {self.agency})
        if (
            sorted(senders) != agencies
            or len(counts) != len(senders)
            or len(signatures) != len(senders)
            or any(c < 0 for c in counts)
            or sum(counts) != len(frame.blobs)
        ):
            raise MessageRejectedError("the partial scores are not one set from each agency with a part")
        assert self.request is not None
        parts, start = [], 0
        for sender, count, signature in zip(senders, counts, signatures, strict=True):
            part = PartialScores(sender, self.request.context_fingerprint, self.plan.register_size,
                                 list(frame.blobs[start : start + count]))  # fmt: skip
            start += count
            statement = partial_statement(self.plan.screening, part)
            verify_statement(self.directory[part.sender], _hex(signature), statement, f"{part.sender}'s partial scores")
            parts.append(part)
        return parts

    def _op_screen_finish(self, frame: Frame) -> Frame:
        if self.lists is None or self.model is None:
            raise ProtocolError(f"{self.agency}: finish before the scores")
        reasons: dict[int, list[dict[str, str]]] = {}
        refusals: dict[str, str] = {}
        answered: set[str] = set()
        for blob in frame.blobs:
            envelope: Envelope = unpack(blob)
            sender = envelope.sender
            if sender not in self.asked or sender in answered:
                raise MessageRejectedError(f"reasons from {sender!r}, whom this screening did not ask (or twice)")
            answered.add(sender)
            try:
                given = open_reasons(envelope, self.keys, self.directory[sender], self.plan.screening)
            except ScreeningRefusedError as exc:  # the agency's own sealed refusal, recorded in its ledger
                refusals[sender] = str(exc)
                continue
            add_reasons(reasons, sender, self.loaded.spec.agency(sender).explain, given)
        for missing in sorted(self.asked - answered):  # the coordinator relayed no answer: said so, not a refusal
            refusals[missing] = f"no answer from {missing} was relayed by the coordinator"
        folder = self.config.files.folder
        outcomes = latest_outcomes(folder.parent, folder.name)
        rows, left = worklist_rows(self.lists, self.model, self.plan.screening, reasons, outcomes, None, None)
        entry = self._use("screening", token_id=self.plan.token_id, households=len(self.lists.scores),
                          counts=dict(self.lists.counts), nonce=secrets.token_hex(16))  # fmt: skip
        sent_field = frame.fields.get("sent", {})
        sent = {str(k): int(v) for k, v in sent_field.items() if isinstance(v, int)} if isinstance(
            sent_field, dict) else {}  # fmt: skip
        report = screening_report(
            self.loaded, self.model, self.lists, self.plan.screening, self.plan.purpose,
            (self.plan.token_id, str(frame.fields.get("token_holder", ""))), None, rows, left, refusals,
            aligned=False, out=self.out, sent=sent | {self.agency: self.sent},
            ledgers={"requester": str(self.config.uses.directory)}, review_band=self.plan.review_band,
        )  # fmt: skip
        files = write_worklists(self.out, rows, report)
        return Frame("ok", {"requester_entry_sha256": entry, "households": len(self.lists.scores), "files": files})

    # ------------------------------------------------------------------ an agency
    def _op_screen_partial(self, frame: Frame) -> Frame:
        if self.is_requester or len(frame.blobs) != 1:
            raise MessageRejectedError(f"{self.agency} takes no partial-score request of this shape")
        request = ScreeningRequest(
            self.plan.screening, self.plan.federation, self.plan.model_version, self.plan.purpose,
            self.plan.requester, int_field(frame, "register_size", 1), frame.blobs[0], str_field(frame, "fingerprint"),
        )  # fmt: skip
        # encrypt only under civil affairs' own key for this screening: never under one the coordinator chose
        statement = context_statement(self.plan.screening, self.plan.requester, request.register_size,
                                      fingerprint(request.public_context))  # fmt: skip
        verify_statement(self.directory[self.plan.requester], _hex(frame.fields.get("signature")), statement,
                         "the screening's public context")  # fmt: skip
        self.contributor = Contributor(self.block, self.weights, self.keys)
        # civil affairs receives each agency's ciphertexts and holds the key: each part is masked so that
        # only their sum opens (the masks cancel over the agencies)
        agencies = {a: self.directory[a] for a in self.plan.parties[1:]}
        mask = zero_sum_mask(self.keys, agencies, self.plan.screening, len(self.block.x))
        self._use("screening-contribution", households=len(self.block.x))  # recorded before anything leaves
        part: PartialScores = self.contributor.partial_scores(request, mask)
        signed = self.keys.sign(partial_statement(self.plan.screening, part)).hex()
        return Frame("ok", {"count": part.count, "fingerprint": part.context_fingerprint, "signature": signed},
                     part.ciphertexts)  # fmt: skip

    def _op_screen_explain(self, frame: Frame) -> Frame:
        if self.contributor is None or len(frame.blobs) != 1 or self.plan.requester not in self.directory:
            raise ProtocolError(f"{self.agency}: a request for reasons out of order")
        requester = self.directory[self.plan.requester]
        try:
            envelope = answer_disclosure(
                self.config.uses, self.loaded, self.contributor, self.keys, requester, unpack(frame.blobs[0]),
                self.plan.screening, self.plan.model_version, self.plan.purpose,
            )  # fmt: skip
        except ScreeningRefusedError as exc:  # recorded in its ledger; sealed, of the same length as reasons
            capacity = reasons_capacity(self.loaded.spec.agency(self.agency).explain_max, len(self.block.x))
            envelope = seal_reasons(self.keys, requester, self.plan.screening, {}, capacity, refusal=str(exc))
        return Frame("ok", blobs=[pack(envelope)])


def _hex(signature: object) -> bytes:
    """A signature field's bytes (MessageRejectedError when it is missing or not hex)."""
    try:
        return bytes.fromhex(str(signature)) if isinstance(signature, str) else b""
    except ValueError:
        raise MessageRejectedError("a signature that is not hex") from None


def model_files(model_dir: Path) -> list[bytes]:
    """The registry files civil affairs needs to apply the card's rule (never weights)."""
    return [(model_dir / name).read_bytes() for name in MODEL_FILES]
