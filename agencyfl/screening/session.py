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

from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys, certify, pack, unpack
from agencyfl.federation.errors import MessageRejectedError, ModelError, ProtocolError, ScreeningRefusedError
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.memory import keep_freed_memory
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
    Distributions,
    Lists,
    add_reasons,
    answer_disclosure,
    categories_under,
    decide_lists,
    screening_report,
    worklist_csv_beside,
    worklist_table,
    write_worklist_page,
)
from agencyfl.screening.worklist import PreviousWorklist, read_worklist
from agencyfl.vertical.encoding import Block, PartyFiles, feature_block, register_block, register_frame
from agencyfl.vertical.job import plan_of
from agencyfl.vertical.model import RegisteredVerticalModel
from agencyfl.vertical.stream import Frame, dispatch, int_field, list_field, peer_directory, str_field

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
        keep_freed_memory()  # reading a million-row table: temporaries reuse pages (agencyfl.memory)
        self.block: Block = (
            register_block(self.loaded, config.files.folder, files=config.files)
            if self.is_requester
            else feature_block(
                self.loaded, self.agency, config.files.folder, files=config.files, size=self.plan.register_size
            )  # fmt: skip
        )
        if self.block.size != self.plan.register_size:
            raise ProtocolError(f"the plan's register has {self.plan.register_size} households; this one has "
                                f"{self.block.size}")  # fmt: skip
        self.weights = self._own_part(self.plan.model_version, self.plan.parts)
        # the clip each part's score gets is its own spec's plan (what it trained with): not the coordinator's word
        self.score_clip = plan_of(self.loaded).score_clip
        previous = self.plan.previous
        # --since with another model: that model's part too, checked now, before anything is scored
        self.old_weights = self._own_part(previous.model_version, previous.parts) if previous else None
        self.previous_worklist: PreviousWorklist | None = None
        if self.is_requester and self.plan.since is not None:  # its own earlier worklist (DataFileError if gone)
            self.previous_worklist = read_worklist(self.out.parent / self.plan.since)
            expected = self.previous_worklist.model_version
            named = previous.model_version if previous else self.plan.model_version
            if previous is not None and named != expected:  # the coordinator may not pick the comparison model
                raise ModelError(f"screening {self.plan.since} used {expected!r}, not {named!r}")
        self.old_model: RegisteredVerticalModel | None = None
        self.old_categories: np.ndarray | None = None
        self.directory: dict[str, PartyPublicKeys] = {self.agency: self.keys.public()}
        self.requester: Requester | None = None
        self.request: ScreeningRequest | None = None
        self.asked: set[str] = set()  # the agencies civil affairs sent a list to
        self.contributor: Contributor | None = None
        self.model: RegisteredVerticalModel | None = None
        self.lists: Lists | None = None
        self.distributions: Distributions | None = None
        self.sent = 0

    def _own_part(self, model_version: str, parts: dict[str, str]) -> np.ndarray:
        """Its part of a model, from its own folder, only if its SHA-256 is the plan's (ModelError if not)."""
        version = model_version.rsplit("/", 1)[-1]
        path = self.config.files.folder / "model" / version / "weights.npy"
        try:
            weights = np.load(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.agency} holds no part of {model_version} ({exc})") from None
        digest = hashlib.sha256(np.ascontiguousarray(weights, dtype="<f8").tobytes()).hexdigest()
        if digest != parts.get(self.agency):
            raise ModelError(f"{self.agency}'s part of {model_version} does not match the model's manifest")
        return np.asarray(weights, dtype=np.float64)

    def _model_from(self, blobs: list[bytes] | tuple[bytes, ...], folder: Path, sha256: str, parts: dict[str, str]) -> (
        RegisteredVerticalModel
    ):  # fmt: skip
        """The registry files the coordinator sent, written to ``folder``, checked against the plan's hashes."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, blob in zip(MODEL_FILES, blobs, strict=True):
            (folder / name).write_bytes(blob)
        model = RegisteredVerticalModel(folder)
        found = {p: part.sha256 for p, part in model.manifest.parts.items()}
        if model.manifest.sha256() != sha256 or model.loaded.sha256 != self.loaded.sha256 or found != parts:
            raise ModelError("the model's manifest, parts or spec are not the one the signed plan names")
        if model.manifest.score_clip != self.score_clip:
            raise ModelError(f"{model.version} clips each part's score at {model.manifest.score_clip}; this spec's "
                             f"plan at {self.score_clip}: retrain it with this version")  # fmt: skip
        return model

    def hello_fields(self) -> dict[str, Any]:
        """What the hello says besides the signature."""
        return {"agency": self.agency, "job": self.plan.screening, "checkpoint": 0}

    def handle(self, frame: Frame) -> Frame:
        """Answer one of the coordinator's frames."""
        return dispatch(self, self.agency, frame)

    def _use(self, kind: str, **fields: Any) -> str:
        spec = self.loaded.spec
        if self.plan.previous is not None:  # the earlier model was run too: on the record as well
            fields["previous_model"] = self.plan.previous.model_version
        return self.config.uses.append(ModelUse(
            kind=kind, owner=self.agency, screening=self.plan.screening, federation=spec.federation.name,  # type: ignore[arg-type]
            model_version=self.plan.model_version, purpose=self.plan.purpose, requester=self.plan.requester,
            time=now_iso(), **fields,
        ))  # fmt: skip

    # ------------------------------------------------------------------ both roles
    def _op_setup(self, frame: Frame) -> Frame:
        # civil affairs checks every agency's partial scores, each agency civil affairs' key and its peers'
        # (their zero-sum masks): every party needs every other party's ledger key
        peers = [p for p in self.plan.parties if p != self.agency]
        self.directory |= peer_directory(
            frame, self.plan.screening, self.agency, peers, self.config.peer_keys, "screen"
        )
        return Frame("ok")

    # ------------------------------------------------------------------ the requester (civil affairs)
    def _op_screen_request(self, frame: Frame) -> Frame:
        wanted = len(MODEL_FILES) * (2 if self.plan.previous else 1)
        if not self.is_requester or len(frame.blobs) != wanted:
            raise MessageRejectedError(f"{self.agency} takes no screening request of this shape")
        blobs = frame.blobs
        model = self._model_from(blobs[: len(MODEL_FILES)], self.out / "model", self.plan.model_sha256, self.plan.parts)
        if self.plan.previous is not None:
            previous = self.plan.previous
            self.old_model = self._model_from(blobs[len(MODEL_FILES) :], self.out / "previous-model",
                                              previous.model_sha256, previous.parts)  # fmt: skip
        self.model = model
        self.requester = Requester(self.agency, self.block.size, self.weights, self.score_clip)
        self.requester.hold(self.block)
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
        current, previous = self._signed_partials(frame)
        logits = self.requester.logits_of(self.request, current)
        files = self.config.files
        registered = register_frame(self.loaded, files.folder, canonical=False, files=files)
        self.lists = decide_lists(self.loaded, self.model, logits, registered, self.plan.review_band)
        self.distributions = Distributions(self.lists, self.loaded, self.plan.review_band)  # while reasons travel
        if self.old_model is not None and self.old_weights is not None:  # today's facts under the earlier model
            old_logits = self.requester.logits_of(self.request, previous, own=self.old_weights)
            self.old_categories = categories_under(self.loaded, self.old_model, old_logits, registered,
                                                   self.plan.review_band)  # fmt: skip
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

    def _signed_partials(self, frame: Frame) -> tuple[list[PartialScores], list[PartialScores]]:
        """Each agency's partial scores as it signed them, one set per agency with a part, none altered; and
        the same under the previous model (``--since`` with another model; else empty)."""
        senders, counts = list_field(frame, "senders", str), list_field(frame, "chunks", int)
        passes = [(self.plan.screening, list_field(frame, "signatures", str))]
        if self.plan.previous is not None:
            passes.append((f"{self.plan.screening}/previous", list_field(frame, "previous_signatures", str)))
        agencies = sorted(self.plan.parts.keys() - {self.agency})
        if (
            sorted(senders) != agencies
            or len(counts) != len(senders)
            or any(len(signatures) != len(senders) for _, signatures in passes)
            or any(c < 0 or c % len(passes) for c in counts)
            or sum(counts) != len(frame.blobs)
        ):
            raise MessageRejectedError("the partial scores are not one set from each agency with a part")
        assert self.request is not None
        out: list[list[PartialScores]] = [[], []]
        start = 0
        for k, (sender, count) in enumerate(zip(senders, counts, strict=True)):
            each = count // len(passes)
            for i, (label, signatures) in enumerate(passes):
                part = PartialScores(sender, self.request.context_fingerprint, self.plan.register_size,
                                     list(frame.blobs[start : start + each]))  # fmt: skip
                start += each
                statement = partial_statement(label, part)
                verify_statement(self.directory[sender], _hex(signatures[k]), statement, f"{sender}'s partial scores")
                out[i].append(part)
        return out[0], out[1]

    def _op_screen_finish(self, frame: Frame) -> Frame:
        if self.lists is None or self.model is None or self.distributions is None:
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
        rows, left = worklist_table(self.lists, self.model, self.plan.screening, reasons, outcomes,
                                   self.previous_worklist, self.old_categories)  # fmt: skip
        entry = self._use("screening", token_id=self.plan.token_id, households=len(self.lists.scores),
                          counts=dict(self.lists.counts), nonce=secrets.token_hex(16))  # fmt: skip
        groups, plots = worklist_csv_beside(self.out, rows, self.distributions)
        sent_field = frame.fields.get("sent", {})
        sent = {str(k): int(v) for k, v in sent_field.items() if isinstance(v, int)} if isinstance(
            sent_field, dict) else {}  # fmt: skip
        report = screening_report(
            self.loaded, self.model, self.lists, self.plan.screening, self.plan.purpose,
            (self.plan.token_id, str(frame.fields.get("token_holder", ""))), self.previous_worklist, rows, left,
            refusals,
            aligned=False, out=self.out, sent=sent | {self.agency: self.sent},
            ledgers={"requester": str(self.config.uses.directory)}, review_band=self.plan.review_band,
            groups=groups,
        )  # fmt: skip
        files = write_worklist_page(self.out, rows, report, plots)
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
        self.contributor = Contributor(self.block, self.weights, self.score_clip, self.keys)
        # civil affairs receives each agency's ciphertexts and holds the key: each part is masked so that
        # only their sum opens (the masks cancel over the agencies)
        agencies = {a: self.directory[a] for a in self.plan.parties[1:]}
        passes = [(self.plan.screening, self.weights)]
        if self.old_weights is not None:  # --since with another model: today's facts under that one too
            passes.append((f"{self.plan.screening}/previous", self.old_weights))
        self._use("screening-contribution", households=self.block.size)  # recorded before anything leaves
        blobs: list[bytes] = []
        signatures: list[str] = []
        for label, weights in passes:
            mask = zero_sum_mask(self.keys, agencies, label, self.block.size)
            part = Contributor(self.block, weights, self.score_clip, self.keys).partial_scores(request, mask)
            signatures.append(self.keys.sign(partial_statement(label, part)).hex())
            blobs += part.ciphertexts
        fields = {"count": self.block.size, "fingerprint": request.context_fingerprint, "signature": signatures[0],
                  "previous_signature": signatures[1] if len(signatures) > 1 else ""}  # fmt: skip
        return Frame("ok", fields, blobs)

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
            capacity = reasons_capacity(self.loaded.spec.agency(self.agency).explain_max, self.block.size)
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
