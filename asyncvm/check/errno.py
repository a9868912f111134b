"""The errno oracle: an ioctl failing with an errno the kernel's ABI does not give for that case.

Scenarios state which errnos an operation may legitimately fail with at that point (the
kernel's documented and implemented ones); anything else is a finding, reported with the errno
the ABI promised, because userspace decides what to do from the errno alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..runtime.failures import Violation
from ..uapi import KvmError, errno_name


def expect_errno(err: KvmError, allowed: Iterable[int], what: str) -> None:
    """Raise the errno violation unless `err` carries one of the `allowed` errnos."""
    allowed = set(allowed)
    if err.errno in allowed:
        return
    got = errno_name(err.errno or 0)
    want = ", ".join(sorted(errno_name(e) for e in allowed)) or "none"
    raise Violation(
        "errno",
        f"{what} failed with {got}; the kernel returns only {want} here ({err})",
        signature=f"errno:{what}:{got}",
        errno=got,
        allowed=want,
    )
