"""From rollout records to tensors, and from a model to per-token logprobs.

Sequences are ``prompt + completion``, **right**-padded: every real token keeps the
position it had when the worker sampled it (positions 0..n-1), so the trainer's logprobs
are comparable with the behaviour logprobs without passing position ids — left padding
(TRL's layout) shifts positions in models that derive them from the sequence index.

Token tensors of the loss live in "target coordinates": column k of a `PackedBatch`
holds the token at sequence position ``first + k + 1``, predicted by the logits at
position ``first + k``, where ``first`` is the shortest prompt's last position. Only
those logits are computed (``logits_to_keep``), so the prompt part of the vocabulary
projection — most of the sequence on repair tasks — is never materialised.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coderepair.protocol.rollout import RolloutRecord
from coderepair.trainer.loss import token_entropy

__all__ = ["PackedBatch", "pack", "token_logprobs"]


@dataclass(frozen=True)
class PackedBatch:
    """A right-padded micro-batch and its loss-side tensors in target coordinates."""

    input_ids: torch.Tensor
    """(B, L) int64, right-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """(B, L) int64: 1 on real tokens."""
    first: int
    """Sequence position of the first logit column needed (min prompt length - 1)."""
    targets: torch.Tensor
    """(B, W) int64: token at position first + k + 1 (pad where none)."""
    mask: torch.Tensor
    """(B, W) bool: column k is a completion token of this row."""
    behaviour_logprobs: torch.Tensor
    """(B, W) float32: the worker's logprob of each completion token (0 elsewhere)."""
    advantages: torch.Tensor
    """(B,) float32."""

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


def pack(records: Sequence[RolloutRecord], advantages: torch.Tensor, pad_id: int) -> PackedBatch:
    """Right-pad ``records`` into one `PackedBatch` (prompt tokens are never scored)."""
    if not records:
        raise ValueError("pack() needs at least one record")
    if advantages.shape != (len(records),):
        raise ValueError(f"advantages must be ({len(records)},), got {tuple(advantages.shape)}")
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in records]
    total = max(lengths)
    first = min(len(r.prompt_ids) for r in records) - 1
    width = total - first - 1
    batch = len(records)
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, total), dtype=torch.long)
    targets = torch.full((batch, max(width, 0)), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, max(width, 0)), dtype=torch.bool)
    behaviour = torch.zeros((batch, max(width, 0)), dtype=torch.float32)
    for i, record in enumerate(records):
        seq = record.prompt_ids + record.completion_ids
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        # Completion token j sits at position P + j, i.e. target column P + j - first - 1.
        start = len(record.prompt_ids) - first - 1
        n = len(record.completion_ids)
        if n:
            targets[i, start : start + n] = torch.tensor(record.completion_ids, dtype=torch.long)
            mask[i, start : start + n] = True
            behaviour[i, start : start + n] = torch.tensor(
                record.behaviour_logprobs, dtype=torch.float32
            )
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention,
        first=first,
        targets=targets,
        mask=mask,
        behaviour_logprobs=behaviour,
        advantages=advantages.to(torch.float32),
    )


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, W) logprobs of ``batch.targets`` under ``model`` (and (B, W) entropies if asked).

    Logprobs are ``log_softmax(logits / temperature)``, the definition the workers use
    for behaviour logprobs. Gradients flow when called under grad mode.
    """
    keep = batch.input_ids.shape[1] - batch.first
    kwargs: dict[str, object] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    # The last kept column predicts the token after the sequence: drop it.
    logits = logits[:, -keep:-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    # gather - logsumexp: the same value as log_softmax().gather() without a second
    # (B, W, V) tensor in the forward pass.
    picked = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    entropy = token_entropy(logits) if with_entropy else None
    return logprobs, entropy
