"""Train / held-out split by problem, so no held-out problem is ever seen in training.

Every task made from one problem gets that problem's split. The split depends on the
problem id alone (not on the build seed, not on which mutants survived), so it is the
same in every build and every party can recompute it.
"""

from __future__ import annotations

import hashlib

from coderepair.protocol.task import Split

HELDOUT_PERCENT = 20
"""Share of problems held out, in percent."""
_SALT = b"coderepair-split-v1:"

SPLIT_RULE = (
    f"by problem: heldout iff int(sha256('coderepair-split-v1:' + problem_id)[:8], 16) "
    f"% 100 < {HELDOUT_PERCENT}, else train"
)
"""The rule in words, as recorded in the task-set header."""


def split_of(problem_id: str, heldout_percent: int = HELDOUT_PERCENT) -> Split:
    """The split of every task made from ``problem_id``."""
    if not 0 <= heldout_percent <= 100:
        raise ValueError(f"heldout_percent must be within 0..100, got {heldout_percent}")
    digest = hashlib.sha256(_SALT + problem_id.encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % 100 < heldout_percent else "train"
