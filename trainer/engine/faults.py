"""Fault injection for the fault tests: `LORA_STUDIO_INJECT_FAULT=KIND@STEP` raises at that optimizer step.

KIND is `oom` (a CUDA out-of-memory error in the step), `enospc` or `eio` (a disk error while saving).
Unset, as it always is outside the tests, `maybe_inject` does nothing.
"""
from __future__ import annotations

import errno
import os

FAULT_ENV = "LORA_STUDIO_INJECT_FAULT"


def maybe_inject(step: int, where: str) -> None:
    """Raise the fault named in $LORA_STUDIO_INJECT_FAULT when `step` and `where` ('step' | 'save') match."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, at = spec.partition("@")
    if not at or int(at) != step:
        return
    if kind == "oom" and where == "step":
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if kind == "enospc" and where == "save":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", "checkpoint")
    if kind == "eio" and where == "save":
        raise OSError(errno.EIO, "Input/output error (injected)", "checkpoint")
