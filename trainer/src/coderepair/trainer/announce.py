"""Announcing published versions to the coordinator (``TrainerService.PublishPolicy``).

`Publisher` has already uploaded a version's shards and signed manifest to the object
store; `PolicyAnnouncer.announce` tells the coordinator where they are, so that it hands
them to workers (``GetPolicy``). The coordinator accepts only its run's latest version
+ 1, verifies the manifest's signature against the run's trainer key, and checks that the
shard list matches the manifest; a refusal comes back as `AnnounceError` with the
coordinator's reason.

`latest_version` asks the coordinator what the run holds (the unauthenticated
``WorkerService.GetPolicy``, 0 when nothing is published), so a resumed trainer knows
which of its versions were announced before it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc

from coderepair.protocol import rpc
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.trainer.stream import signed_envelope
from coderepair.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc, worker_pb2, worker_pb2_grpc

__all__ = ["AnnounceError", "PolicyAnnouncer", "ShardUrl"]

ShardUrl = Mapping[str, str]
"""Shard file name -> URL a worker downloads it from."""

_MAX_METRICS = 64


class AnnounceError(ProtocolError):
    """The coordinator refused a version, or could not be reached."""


class PolicyAnnouncer:
    """Signed PublishPolicy calls for one run, over one channel."""

    def __init__(
        self, address: str, run_id: str, identity: Identity, *, timeout_s: float = 30.0
    ) -> None:
        self.address = address
        self.run_id = run_id
        self.timeout_s = timeout_s
        self._identity = identity
        self._channel = grpc.insecure_channel(address, options=rpc.channel_options())
        self._trainer = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._worker = worker_pb2_grpc.WorkerServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def latest_version(self) -> int:
        """The run's latest published version at the coordinator (0: none yet)."""
        try:
            answer = self._worker.GetPolicy(
                worker_pb2.GetPolicyRequest(run_id=self.run_id), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            # A run with nothing published answers "version 0 does not exist (yet)".
            no_policy = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            if isinstance(exc, grpc.Call) and exc.code() in no_policy:
                return 0
            raise self._unreachable("GetPolicy", exc) from exc
        return max((int(p.version) for p in answer.chain), default=0)

    def announce(
        self,
        manifest_bytes: bytes,
        version: int,
        shards: Mapping[str, tuple[int, str]],
        urls: ShardUrl,
        *,
        trained_through_cursor: int,
        trainer_step: int,
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Announce ``version``; ``shards`` maps name -> (size, sha256). Returns the latest."""
        missing = sorted(set(shards) - set(urls))
        if missing:
            raise AnnounceError(f"no URL for shards {missing[:5]}: upload them first")
        finite = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(v)}
        payload = trainer_pb2.PublishPayload(
            run_id=self.run_id,
            version=version,
            manifest_json=manifest_bytes,
            shards=[
                common_pb2.ShardLocation(name=name, urls=[urls[name]], size_bytes=size, sha256=sha)
                for name, (size, sha) in shards.items()
            ],
            trained_through_cursor=trained_through_cursor,
            trainer_step=trainer_step,
            metrics=dict(sorted(finite.items())[:_MAX_METRICS]),
        )
        method = f"/{rpc.TRAINER_SERVICE}/PublishPolicy"
        request = trainer_pb2.PublishPolicyRequest(
            envelope=signed_envelope(self._identity, method, payload)
        )
        try:
            answer = self._trainer.PublishPolicy(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._unreachable("PublishPolicy", exc) from exc
        if not answer.accepted:
            raise AnnounceError(
                f"the coordinator refused version {version} of run {self.run_id!r} "
                f"({common_pb2.RejectionReason.Name(answer.rejection.reason)}): "
                f"{answer.rejection.message} (its latest version is {answer.latest_version})"
            )
        return int(answer.latest_version)

    def _unreachable(self, method: str, exc: grpc.RpcError) -> AnnounceError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        rejection = None
        if isinstance(exc, grpc.Call):
            try:
                rejection = rpc.rejection_from_metadata(exc.trailing_metadata())
            except ProtocolError:
                rejection = None
        reason = rejection.message if rejection is not None else detail
        return AnnounceError(
            f"{method} to {self.address} for run {self.run_id!r} failed ({code}): {reason}; "
            "check the coordinator address and that its run names this trainer's public key"
        )
