"""One agency's side of a deployed vertical job: its block, keys, ledger and checkpoints, answering frames.

The agency's ClientApp (``clients.vertical_steps``) builds a ``PartySession`` once the coordinator's
signed plan checks out, dials the stream and hands each frame to ``handle``. Everything the one-machine
protocol objects do happens here, at the agency: its block never leaves, its ledger admits each release
before it sends the masked gradient the release is made from, and it checkpoints its own block after
every iteration (``docs/vertical.md``, "In a deployment").
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agencyfl.alignment.sealed import PartyKeys, certify, pack, unpack
from agencyfl.federation.errors import MessageRejectedError, ProtocolError
from agencyfl.federation.fingerprint import file_fingerprint
from agencyfl.federation.metrics import exact_metrics
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.accounting import epsilon_for
from agencyfl.privacy.budget import lifetime_rdp
from agencyfl.privacy.ledger import Ledger, spend_records
from agencyfl.vertical.encoding import LabelData, PartyFiles, feature_block, label_block, register_frame
from agencyfl.vertical.evidence import RECEIPTS
from agencyfl.vertical.job import admit, fairness_release, plan_of
from agencyfl.vertical.model import INTERCEPT, save_part
from agencyfl.vertical.optim import sweep_starts_fresh
from agencyfl.vertical.protocol import FeatureHolder, GradientMessage, HolderSetup, LabelHolder
from agencyfl.vertical.remote import VerticalJobPlan
from agencyfl.vertical.stream import Frame, dispatch, int_field, list_field, peer_directory, str_field

CHECKPOINTS_KEPT = 2


@dataclass
class PartyConfig:
    """What the agency's side needs: who it is, its own spec and files, its ledger and keys, its peers' keys."""

    agency: str
    loaded: LoadedVerticalSpec
    job: VerticalJobPlan
    files: PartyFiles  # its data file and its folder (alignment/, vertical/, model/)
    ledger: Ledger
    ledger_key: Ed25519PrivateKey  # certifies its run keys (never leaves)
    peer_keys: dict[str, Ed25519PublicKey]  # the ledger keys its steward was handed for its counterparts


class PartySession:
    """This agency's role in one deployed vertical job."""

    # once per job: a second validation decryption, fairness release or part would be an oracle or a rewrite
    once_only = frozenset({"setup", "hessian-weights", "hessian", "hessian-release", "masked-scores", "scores",
                           "admit-fairness", "fairness", "finish"})  # fmt: skip

    def __init__(self, config: PartyConfig) -> None:
        self.config = config
        self.agency, self.loaded, self.job = config.agency, config.loaded, config.job
        self.plan = plan_of(config.loaded)
        self.is_label = self.agency == self.job.label_holder
        self.keys = PartyKeys.generate(self.agency)
        self.certificate = certify(self.job.job, self.keys.public(), config.ledger_key)
        self.labels: LabelData | None = None
        if self.is_label:
            self.block, self.labels = label_block(config.loaded, config.files.folder, files=config.files)
            if self.block.size != self.job.register_size:
                raise ProtocolError(
                    f"the plan's register has {self.job.register_size} households; this one {self.block.size}"
                )
        else:
            self.block = feature_block(
                config.loaded, self.agency, config.files.folder, files=config.files, size=self.job.register_size
            )
        self.holder: FeatureHolder | LabelHolder | None = None
        self._own_residuals: list[bytes] = []
        self._logits: np.ndarray | None = None
        self.checkpoints = config.files.folder / "vertical" / self.job.job
        self.resume_from = 0  # the coordinator's setup says (a resumed job): the iteration to restore
        self.released_through = 0  # ... and the last iteration its chain records as released
        self.last_gradient = 0  # iterations only go forward within a session
        self.last_release = 0
        self.last_rescaled = 0
        self.fairness_admitted = False
        self.admitted = 0  # sequential sweeps: the last sweep its ledger admitted (before any of its releases)
        self.order = [p for p in self.job.parties if p != self.job.label_holder] + [self.job.label_holder]
        self.turn = self.order.index(self.agency) + 1  # its sub-step in a sweep: the agencies, then civil affairs
        self.issued = 0  # civil affairs: the last sub-step of the sweep whose residual it issued
        self.partial_steps: dict[str, str] = {}  # civil affairs: the sub-step each agency's latest scores are for
        self.fresh = True  # a sweep whose agencies send their scores first (the session's first, or after a rescale)
        self.last_factor = 1.0
        self.resumed = False  # the coordinator's setup says the job is resumed (even from iteration 0)

    # ------------------------------------------------------------------ checkpoints (its own block only)
    def last_checkpoint(self) -> int:
        """The last iteration this party checkpointed for this job (0: none)."""
        done = [int(p.stem.split("-")[1]) for p in self.checkpoints.glob("checkpoint-*.npz")]
        return max(done, default=0)

    def _checkpoint(self, iteration: int) -> None:
        holder = self._holder()
        self.checkpoints.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.checkpoints / f"checkpoint-{iteration}.npz"
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            state = holder.optimizer.state() | holder.tail.state()
            np.savez(fh, weights=holder.weights, m=state["m"], v=state["v"], t=state["t"],
                     tail_total=state["tail_total"], tail_added=state["tail_added"])  # fmt: skip
        tmp.replace(path)
        for old in self.checkpoints.glob("checkpoint-*.npz"):
            if int(old.stem.split("-")[1]) <= iteration - CHECKPOINTS_KEPT:
                old.unlink()

    def _restore(self, iteration: int) -> None:
        holder = self._holder()
        path = self.checkpoints / f"checkpoint-{iteration}.npz"
        try:
            with np.load(path) as saved:  # a checkpoint from before averaging has no running mean: it starts empty
                weights, state = saved["weights"], {k: saved[k] for k in ("m", "v", "t", "tail_total", "tail_added")
                                                     if k in saved or not k.startswith("tail")}  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise ProtocolError(f"{self.agency} cannot resume from iteration {iteration}: {exc}") from None
        if weights.shape != holder.weights.shape:
            raise ProtocolError(f"{self.agency}'s checkpoint {path.name} is for {weights.shape[0]} weights")
        holder.weights = np.asarray(weights, dtype=np.float64)
        holder.optimizer.restore(state)
        if "tail_total" in state:
            holder.tail.restore(state)
        if self.plan.releases_hessian:  # the step matrix comes from its own copy of the Hessian release
            self._load_hessian()

    def _load_hessian(self) -> None:
        try:
            self._holder().set_hessian(np.load(self._hessian_path()))
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"{self.agency} cannot resume without its Hessian release: {exc}") from None

    def _hessian_path(self) -> Path:
        return self.checkpoints / "hessian-release.npy"

    def _save_hessian(self, released: np.ndarray) -> None:
        """Its block's noisy Hessian (a DP release it received: post-processing to keep), for a resumed job."""
        self.checkpoints.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._hessian_path()
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            np.save(fh, released)
        tmp.replace(path)

    # ------------------------------------------------------------------ frames
    def hello_fields(self) -> dict[str, Any]:
        """What the hello says besides the signature: the party, the job, its last checkpoint."""
        return {"agency": self.agency, "job": self.job.job, "checkpoint": self.last_checkpoint(),
                "hessian": self._hessian_path().exists()}  # fmt: skip

    def handle(self, frame: Frame) -> Frame:
        """Answer one of the coordinator's frames (``MessageRejectedError`` for one this role does not take)."""
        return dispatch(self, self.agency, frame)

    def _holder(self) -> FeatureHolder | LabelHolder:
        if self.holder is None:
            raise ProtocolError(f"{self.agency}: a step before setup")
        return self.holder

    def _label(self) -> LabelHolder:
        holder = self._holder()
        if not isinstance(holder, LabelHolder):
            raise MessageRejectedError(f"{self.agency} holds no labels: the step is civil affairs'")
        return holder

    def _features(self) -> FeatureHolder:
        holder = self._holder()
        if not isinstance(holder, FeatureHolder):
            raise MessageRejectedError(f"{self.agency} holds the labels: the step is a feature holder's")
        return holder

    def _op_setup(self, frame: Frame) -> Frame:
        peers = [p for p in self.job.parties if p != self.agency] if self.is_label else [self.job.label_holder]
        directory = {self.agency: self.keys.public()}
        directory |= peer_directory(frame, self.job.job, self.agency, peers, self.config.peer_keys, "train")
        evidence = self.config.files.folder / "evidence" / self.job.job
        setup = HolderSetup(
            keys=self.keys, directory=directory, run=self.job.job, public_context=frame.blobs[0],
            label_holder=self.job.label_holder, optimizer=self.plan.optimizer, learning_rate=self.plan.learning_rate,
            weight_bound=self.plan.weight_bound, projection=self.plan.projection, score_clip=self.plan.score_clip,
            newton_damping=self.plan.hessian_damping(self.block.width + self.is_label, self.job.register_size),
            iterations=self.plan.iterations, averaged=self.plan.averaged,
            # what an audit needs to replay this party's products, in its own folder (docs/vertical.md,
            # "Accountability"): an agency's evidence, civil affairs' receipts
            evidence=None if self.is_label else evidence,
            receipts=evidence / RECEIPTS if self.is_label else None,
            receipts_key=self.config.ledger_key,
            # the run-key certificates the coordinator forwarded (peer_directory verified the label holder's)
            certificates=dict(zip(list_field(frame, "certificates", str), frame.blobs[1:], strict=True)),
        )  # fmt: skip
        rng = np.random.default_rng(secrets.randbits(128))
        if self.is_label:
            assert self.labels is not None
            self.holder = LabelHolder(self.block, self.labels, setup, rng)
        else:
            self.holder = FeatureHolder(self.block, setup, rng)
        resume_from, released = int_field(frame, "resume_from"), int_field(frame, "released_through")
        if not 0 <= resume_from < self.job.iterations or released < 0:
            raise MessageRejectedError(
                f"a resume point {resume_from} outside the job's {self.job.iterations} iterations"
            )
        if resume_from > 0:
            self._restore(resume_from)  # only a checkpoint it wrote itself; an older one only costs budget
        elif frame.fields.get("restore_hessian") is True:  # resumed before any checkpoint, after the release
            self._load_hessian()
        self.resume_from, self.released_through = resume_from, released
        self.resumed = frame.fields.get("resumed") is True
        return Frame("ok", {"width": len(self.holder.weights)})

    @property
    def step(self) -> int:
        """The iteration its weights are at: the one after the last it rescaled (or resumed from). Partial scores
        and residuals are sealed for it, so a relay cannot hand a party another iteration's."""
        return max(self.resume_from, self.last_rescaled) + 1

    def _hessian_first(self) -> None:
        if not self.plan.releases_hessian:
            raise MessageRejectedError(f"this job's optimizer ({self.plan.optimizer}) releases no Hessian")
        if self.resume_from > 0 or self.last_gradient > 0 or self._holder().hessian_release is not None:
            raise MessageRejectedError("the Hessian release comes before the first iteration")

    def _op_hessian_weights(self, frame: Frame) -> Frame:
        self._hessian_first()
        sealed = self._label().hessian_weights([p for p in self.job.parties if p != self.agency])
        return Frame("ok", blobs=[pack(e) for envelopes in sealed.values() for e in envelopes])

    def _op_hessian(self, frame: Frame) -> Frame:
        """Admit the Hessian release in its own ledger, then send its masked block Hessian."""
        self._hessian_first()
        holder = self._holder()
        envelopes = [unpack(b) for b in frame.blobs]
        if isinstance(holder, LabelHolder) and envelopes:
            raise MessageRejectedError("civil affairs computes its own Hessian: it takes no envelopes")
        # computed first (its envelopes opened and checked: a bad relay costs no budget), then admitted: the
        # ledger records the release before the masked triangle leaves, so before anything is decrypted
        message = holder.masked_hessian() if isinstance(holder, LabelHolder) else holder.masked_hessian(envelopes)
        entry = admit(self.config.ledger, self.loaded, self.plan, self.job.job, self.agency, 0, "vertical-hessian")
        fields = {"epsilon_job": entry.epsilon_job, "epsilon_lifetime": entry.epsilon_lifetime,
                  "epsilon_lifetime_rdp": self._lifetime_rdp(),
                  "origin": self.config.ledger.verification().origin}  # fmt: skip
        return Frame("ok", fields, blobs=message.ciphertexts)

    def _op_hessian_release(self, frame: Frame) -> Frame:
        values = frame.fields.get("values")
        if not isinstance(values, list) or not all(isinstance(v, float | int) for v in values):
            raise MessageRejectedError("a malformed Hessian release")
        holder = self._holder()
        holder.apply_hessian([float(v) for v in values])
        assert holder.hessian_release is not None
        self._save_hessian(holder.hessian_release)
        return Frame("ok")

    def _op_partial(self, frame: Frame) -> Frame:
        """Its partial scores, sealed for the iteration (simultaneous) or the sub-step (sequential): ``T.0`` at a
        sweep's start, ``T.j`` after its own step j of the sweep (which it alone decides: a relay cannot ask
        for scores under another sub-step)."""
        holder = self._features()
        step: int | str = self.step
        if self.plan.order == "sequential" and self.step <= self.job.iterations:  # after: the validation's
            if self.admitted != self.step:  # scores of a sweep only once every ledger was asked to admit it
                raise MessageRejectedError(f"scores for sweep {self.step} before its admission")
            step = f"{self.step}.{self.turn if self.last_release == self.step else 0}"
        return Frame("ok", blobs=[pack(e) for e in holder.partial_scores(step)])

    def _partials(self, frame: Frame) -> dict[str, list[Any]]:
        partials: dict[str, list[Any]] = {p: [] for p in self.job.parties if p != self.agency}
        for blob in frame.blobs:
            envelope = unpack(blob)
            if envelope.sender not in partials:
                raise MessageRejectedError(f"partial scores from {envelope.sender!r}, not a party")
            partials[envelope.sender].append(envelope)
        return partials

    def _op_residuals(self, frame: Frame) -> Frame:
        self._simultaneous()
        own, sealed = self._label().residuals(self._partials(frame), self.step)
        self._own_residuals = own
        return Frame("ok", blobs=[pack(e) for envelopes in sealed.values() for e in envelopes])

    def _simultaneous(self) -> None:
        if self.plan.order != "simultaneous":
            raise MessageRejectedError(f"this job's parties step in turn ({self.plan.order}): not this frame")

    def _sequential(self, iteration: int) -> None:
        if self.plan.order != "sequential":
            raise MessageRejectedError("this job's parties step at once (simultaneous): not this frame")
        if iteration != self.step or self.admitted != iteration:
            raise MessageRejectedError(
                f"sweep {iteration}: {self.agency} is at {self.step} and admitted {self.admitted}"
            )

    def _op_admit(self, frame: Frame) -> Frame:
        """Sequential sweeps: admit the whole sweep in its own ledger before any of its releases (the K block
        releases together are the iteration's release), and report its gains for the noise's spread."""
        iteration = int_field(frame, "iteration", 1, self.job.iterations)
        if self.plan.order != "sequential" or iteration != self.step or self.admitted >= iteration:
            raise MessageRejectedError(f"an admission of sweep {iteration}; {self.agency} is at {self.step}")
        if self.plan.releases_hessian and self._holder().hessian_release is None:  # nothing spent before then
            raise MessageRejectedError("a sweep before the Hessian release: its noise would not be shaped")
        entry = self._admit(iteration)
        self.fresh = sweep_starts_fresh(iteration, self.resume_from + 1, self.last_factor)
        self.admitted, self.issued = iteration, 0
        if self.fresh:  # scores of the weights it held before are no longer what the agencies step from
            self.partial_steps = {}
        return Frame("ok", self._report(entry) | {"gains": list(self._holder().gains)})

    def _op_partials(self, frame: Frame) -> Frame:
        """Civil affairs keeps each agency's latest partial scores, opened under the sub-step it expects from
        that agency now: ``T.j`` once the agency's step j of sweep T is past, else ``T.0`` in a sweep whose
        agencies send their scores first (and no other)."""
        holder = self._label()
        self._sequential(int_field(frame, "iteration", 1, self.job.iterations))
        for sender, envelopes in self._partials(frame).items():
            if not envelopes:
                continue
            turn = self.order.index(sender) + 1
            if turn > self.issued and not self.fresh:
                raise MessageRejectedError(f"{sender}'s scores before its step of sweep {self.step}: not asked")
            step = f"{self.step}.{turn if turn <= self.issued else 0}"
            if self.partial_steps.get(sender) == step:
                raise MessageRejectedError(f"{sender}'s partial scores for {step} again")
            holder.take_partials(sender, envelopes, step)
            self.partial_steps[sender] = step
        return Frame("ok")

    def _op_residual(self, frame: Frame) -> Frame:
        """Civil affairs: the residual for the next party's step of the sweep (in order), from every agency's
        latest scores, each of this sweep and past its own step where that step has come."""
        holder = self._label()
        self._sequential(int_field(frame, "iteration", 1, self.job.iterations))
        turn = self.issued + 1
        target = str_field(frame, "to")
        if turn > len(self.order) or target != self.order[turn - 1]:
            raise MessageRejectedError(f"a residual for {target[:40]!r}; sub-step {turn} is not its turn")
        # stepped this sweep: its scores after that step; not yet: sent first (fresh) or after its last step
        before = {p: f"{self.step}.0" if self.fresh else f"{self.step - 1}.{i}" for i, p in enumerate(self.order, 1)}
        expected = {p: f"{self.step}.{i}" if i < turn else before[p] for i, p in enumerate(self.order[:-1], start=1)}
        stale = sorted(p for p, step in expected.items() if self.partial_steps.get(p) != step)
        if stale:
            raise MessageRejectedError(f"sub-step {turn}: no current partial scores from {', '.join(stale)}")
        self.issued = turn
        raw = holder.residual()
        if target == self.agency:
            self._own_residuals = raw
            return Frame("ok")
        return Frame("ok", blobs=[pack(e) for e in holder.seal_residual(raw, target, f"{self.step}.{turn}")])

    def _lifetime_rdp(self) -> float:
        """Its ledger's lifetime by RDP alone, for the chain's record (``LedgerRecord.lost_spend``)."""
        return lifetime_rdp(self.config.ledger.events())

    def _admit(self, iteration: int) -> Any:
        # an admission is reused on resume only if the coordinator's chain says the iteration was never
        # released and this agency never received its release either (its own record, written first)
        resumed = self.resume_from > 0 or self.resumed
        reuse = resumed and iteration > self.released_through and not self._received(iteration)
        return admit(self.config.ledger, self.loaded, self.plan, self.job.job, self.agency, iteration, reuse=reuse)

    def _report(self, entry: Any) -> dict[str, Any]:
        return {
            "epsilon_job": entry.epsilon_job,
            "epsilon_lifetime": entry.epsilon_lifetime,
            "epsilon_lifetime_rdp": self._lifetime_rdp(),
            "origin": self.config.ledger.verification().origin,
        }

    def _op_gradient(self, frame: Frame) -> Frame:
        iteration = int_field(frame, "iteration", 1, self.job.iterations)
        if not max(self.resume_from, self.last_gradient) < iteration <= self.job.iterations:
            raise MessageRejectedError(
                f"iteration {iteration} is not after {max(self.resume_from, self.last_gradient)} inside the job"
            )
        if iteration != self.step:
            raise MessageRejectedError(f"a gradient for iteration {iteration}; {self.agency} is at {self.step}")
        sequential = self.plan.order == "sequential"
        if sequential:  # admitted at the sweep's start; its residual issued for its own turn
            self._sequential(iteration)
        holder = self._holder()
        if self.plan.releases_hessian and holder.hessian_release is None:  # before its admission: nothing spent
            raise MessageRejectedError("a gradient before the Hessian release: there is no step to take with it")
        if isinstance(holder, LabelHolder):
            if sequential and self.issued != self.turn:
                raise MessageRejectedError("civil affairs' gradient before its own residual")
            residual = self._own_residuals
        else:
            step: int | str = f"{self.step}.{self.turn}" if sequential else self.step
            residual = holder.open_residuals([unpack(b) for b in frame.blobs], step)
        fields: dict[str, Any] = {}
        if not sequential:
            fields = self._report(self._admit(iteration))
        message: GradientMessage = holder.masked_gradient(residual)
        self.last_gradient = iteration
        return Frame("ok", fields | {"gains": list(message.gains)}, blobs=message.ciphertexts)

    def _received_marker(self, iteration: int) -> Path:
        return self.checkpoints / f"released-{iteration}"

    def _received(self, iteration: int) -> bool:
        return self._received_marker(iteration).exists()

    def _mark_received(self, iteration: int) -> None:
        """Recorded (fsynced) before the release is applied: after a crash, that iteration counts again."""
        self.checkpoints.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, flags in (
            (self._received_marker(iteration), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (self.checkpoints, os.O_RDONLY),
        ):  # the file, then its directory entry
            fd = os.open(path, flags, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _op_release(self, frame: Frame) -> Frame:
        holder = self._holder()
        values = frame.fields.get("values")
        if not isinstance(values, list) or not all(isinstance(v, float | int) for v in values):
            raise MessageRejectedError("a malformed release")
        if self.last_gradient <= self.last_release:
            raise ProtocolError(f"{self.agency}: a release with no masked gradient of its own pending")
        self._mark_received(self.last_gradient)
        holder.apply([float(v) for v in values])
        self.last_release = self.last_gradient
        return Frame("ok", {"squared_norm": holder.squared_norm()})

    def _op_rescale(self, frame: Frame) -> Frame:
        holder = self._holder()
        iteration, factor = int_field(frame, "iteration", 1), frame.fields.get("factor")
        if not isinstance(factor, float | int) or isinstance(factor, bool):
            raise MessageRejectedError("a rescale frame without a numeric factor")
        if iteration != self.last_release or self.last_rescaled >= iteration:
            raise MessageRejectedError(
                f"a rescale for iteration {iteration}; the last release was {self.last_release}, "
                f"rescaled through {self.last_rescaled}"
            )
        holder.rescale(float(factor))
        self.last_factor = float(factor)
        holder.end_iteration(iteration)
        if iteration == self.job.iterations:
            holder.finish()  # the model: the mean of the last iterations' weights (post-processing)
        self.last_rescaled = iteration
        self._checkpoint(iteration)
        return Frame("ok")

    def _op_masked_scores(self, frame: Frame) -> Frame:
        if self.last_rescaled != self.job.iterations:  # the card's AUC must describe the registered model
            raise ProtocolError(f"{self.agency}: validation scores after iteration {self.last_rescaled} of "
                                f"{self.job.iterations}")  # fmt: skip
        return Frame("ok", blobs=self._label().masked_scores(self._partials(frame), self.step))

    def _op_scores(self, frame: Frame) -> Frame:
        holder = self._label()
        if len(frame.blobs) != 1 or len(frame.blobs[0]) % 8:
            raise MessageRejectedError("a malformed scores frame")
        logits = holder.unmask_scores(np.frombuffer(frame.blobs[0], dtype="<f8").astype(np.float64))
        assert self.labels is not None
        self._logits = logits
        y = self.labels.y[self.labels.validation]
        auc = exact_metrics(1 / (1 + np.exp(-logits)), y).auc if len(y) else float("nan")
        # the exact AUC is a function of its labels: it stays here (the card gets a noised one, `fairness`)
        path = self.checkpoints / "validation.json"
        self.checkpoints.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump({"job": self.job.job, "validation_auc": float(auc), "n": int(len(y))}, fh)
        return Frame("ok")  # not even the count: the card gets a noised one

    def _op_admit_fairness(self, frame: Frame) -> Frame:
        iteration = int_field(frame, "iteration")
        if iteration != self.job.iterations + 1:
            raise MessageRejectedError(f"the fairness release is iteration {self.job.iterations + 1}, not {iteration}")
        entry = admit(self.config.ledger, self.loaded, self.plan, self.job.job, self.agency, iteration, "fairness")
        self.fairness_admitted = True
        return Frame("ok", {"epsilon_job": entry.epsilon_job, "epsilon_lifetime": entry.epsilon_lifetime})

    def _op_fairness(self, frame: Frame) -> Frame:
        self._label()
        if self._logits is None or self.labels is None:
            raise ProtocolError("the fairness counts come after the validation scores")
        loaded, files = self.loaded, self.config.files

        def admitted() -> None:  # at every agency in the step before; here its own ledger's word decides
            if not self.fairness_admitted:
                raise ProtocolError(f"{self.agency}: fairness counts its own ledger has not admitted")

        released = fairness_release(
            loaded, lambda: register_frame(loaded, files.folder, files=files), self.labels, self._logits, admitted
        )
        return Frame("ok", {"card": released.card, "auc": released.auc, "n": released.households,
                            "withheld": released.withheld})  # fmt: skip

    def _op_finish(self, frame: Frame) -> Frame:
        holder = self._holder()
        if self.last_rescaled != self.job.iterations:
            raise ProtocolError(f"{self.agency}: finish after iteration {self.last_rescaled} of {self.job.iterations}")
        version = str_field(frame, "version")
        if not version.startswith("v") or not version[1:].isdigit():
            raise MessageRejectedError(f"a model version {version[:20]!r} is not vNNNN")
        path, digest = save_part(self.config.files.folder, version, holder.weights)
        inputs = [*self.block.names, INTERCEPT] if self.is_label else list(self.block.names)
        events, delta = self.config.ledger.events(), self.loaded.spec.privacy.delta
        return Frame("ok", {
            "path": path, "sha256": digest, "inputs": inputs, "dataset": file_fingerprint(self.config.files.data),
            "epsilon_job": epsilon_for(spend_records(events, self.job.job), delta),
            "epsilon_lifetime": epsilon_for(spend_records(events), delta),
        })  # fmt: skip


def read_peer_keys(folder: Path, names: list[str]) -> dict[str, Ed25519PublicKey]:
    """The ledger keys a steward was handed for ``names`` (``HOME/peers/NAME.pub``), those that exist."""
    from agencyfl.privacy.keys import keyring_key

    keys = {}
    for name in names:
        key = keyring_key(folder, name)
        if key is not None:
            keys[name] = key
    return keys
