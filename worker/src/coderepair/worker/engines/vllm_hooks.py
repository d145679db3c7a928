"""Functions the vLLM engine runs inside vLLM's workers (``LLM.collective_rpc``).

Each takes vLLM's worker object first, as ``collective_rpc`` requires. They live in their
own importable module so that vLLM can ship them to a worker process by reference when
the engine core runs out of process (with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), and
they return plain bytes, ints and strings, never tensors, for the same reason.

Hidden-state capture: a forward hook on the model's final norm (``model.model.norm``,
whose output is the input of ``lm_head``) copies, at every forward pass, the rows of
every request the engine tagged (`vllm_sampling.request_extra_args`). The flattened
batch holds request ``i``'s tokens at rows ``query_start_loc[i]:query_start_loc[i+1]``,
at sequence positions starting from ``num_computed_tokens[i]`` — the same bookkeeping
vLLM uses to build its position ids. A proof needs the rows at positions
``len(prompt) - 1 ...``: the prompt's last position is recomputed even on a full
prefix-cache hit, and every later one is a decode step, so generation alone yields all
of them, with no extra prefill.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from coderepair.worker.engines.vllm_sampling import EXTRA_ARGS_KEY

__all__ = [
    "discard_hidden_rows",
    "install_hidden_capture",
    "reload_weights",
    "take_hidden_rows",
]

_CAPTURE_ATTR = "_coderepair_hidden_capture"


@dataclass
class _Capture:
    """Rows captured per tag: (first position, [tokens, H] float32 chunk) per forward."""

    rows: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    handle: Any = None


def _runner(worker: Any) -> Any:
    return worker.model_runner


def _tag_of(runner: Any, req_id: str) -> str | None:
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    spec = extra.get(EXTRA_ARGS_KEY)
    return None if spec is None else str(spec["tag"])


def install_hidden_capture(worker: Any) -> str:
    """Hook the final norm once; returns "" on success, else why it cannot be hooked."""
    runner = _runner(worker)
    if getattr(runner, _CAPTURE_ATTR, None) is not None:
        return ""
    model = runner.get_model()
    norm = getattr(getattr(model, "model", None), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        return (
            f"{type(model).__name__} has no model.norm module to capture the last hidden state from"
        )
    capture = _Capture()

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # vLLM's fused RMSNorm returns (normed, residual) when given a residual.
        hidden = output[0] if isinstance(output, tuple) else output
        batch = runner.input_batch
        n = int(batch.num_reqs)
        if n == 0:
            return  # a warm-up or profiling pass
        starts = runner.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        tags = [_tag_of(runner, req_id) for req_id in batch.req_ids[:n]]
        if all(tag is None for tag in tags):
            return
        # One device-to-host copy per forward (rows past starts[n] are padding).
        rows = hidden[: int(starts[n])].detach().to(device="cpu", dtype=torch.float32, copy=True)
        for i, tag in enumerate(tags):
            lo, hi = int(starts[i]), int(starts[i + 1])
            if tag is not None and hi > lo:
                capture.rows.setdefault(tag, []).append((int(computed[i]), rows[lo:hi]))

    capture.handle = norm.register_forward_hook(hook)
    setattr(runner, _CAPTURE_ATTR, capture)
    return ""


def _capture(worker: Any) -> _Capture:
    capture = getattr(_runner(worker), _CAPTURE_ATTR, None)
    if capture is None:
        raise RuntimeError("hidden-state capture is not installed on this worker")
    assert isinstance(capture, _Capture)
    return capture


def discard_hidden_rows(worker: Any) -> int:
    """Forget every captured row (rows of aborted calls); returns how many tags held rows."""
    capture = _capture(worker)
    count = len(capture.rows)
    capture.rows.clear()
    return count


def take_hidden_rows(
    worker: Any, wanted: list[tuple[str, int, int]]
) -> list[tuple[int, int, bytes, int]]:
    """Assemble and forget the rows of each ``(tag, first position, count)``.

    Returns per entry ``(rows, hidden size, float32 bytes, rows missing)``; a missing
    row (never computed) is left as NaN and counted, so the caller can refuse it.
    """
    capture = _capture(worker)
    out: list[tuple[int, int, bytes, int]] = []
    for tag, first, count in wanted:
        chunks = capture.rows.pop(tag, [])
        width = chunks[0][1].shape[-1] if chunks else 0
        result = torch.full((count, width), float("nan"), dtype=torch.float32)
        filled = torch.zeros(count, dtype=torch.bool)
        # Later chunks win: a preempted request recomputes its positions, same values.
        for start, chunk in chunks:
            lo, hi = max(start, first), min(start + chunk.shape[0], first + count)
            if hi > lo:
                result[lo - first : hi - first] = chunk[lo - start : hi - start]
                filled[lo - first : hi - first] = True
        missing = int((~filled).sum())
        out.append((count, int(width), result.numpy().tobytes(), missing))
    return out


def reload_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's in-place reload from checkpoint-format tensors held in memory.

    Not ``model.load_weights`` (it fails after start-up on the CPU backend, which repacks
    linear weights). A tied ``lm_head`` shares the embedding's tensor but gets no weights
    of its own, so vLLM never re-runs its post-load step; on CPU that step builds a packed
    copy for the logits GEMM, which would keep computing logits from the old embedding
    while the hidden states already follow the new weights. It is re-run here.
    """
    worker.reload_weights(weights_iterator=list(weights))
    model = _runner(worker).get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None:
        return
    if head.weight.data_ptr() == embed.weight.data_ptr():
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
