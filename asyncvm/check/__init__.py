"""The oracles: observers of the events the model announces through its tracepoints.

Importing this package attaches them, as loading a module registers its probes; from then on
every VM created is watched. The model never imports it.
"""

from . import gmem_mmap, invariants, snp, tdp_mmu, tdx


def attach() -> None:
    """Register every oracle's probes (idempotent)."""
    invariants.attach()
    tdx.attach()
    snp.attach()
    gmem_mmap.attach()
    tdp_mmu.attach()


attach()


def check_quiescent(vm: object) -> None:
    """Run every quiescence check of `vm`'s oracles now (for live mode, which has no executor
    to run them when the last task ends); raises the first ``Violation``."""
    for registry in (invariants.ORACLES, tdx.ORACLES, snp.ORACLES, tdp_mmu.ORACLES):
        oracles = registry.get(vm)
        if oracles is not None:
            oracles.at_quiescence()
    kvm = getattr(vm, "kvm", None)
    host = gmem_mmap.ORACLES.get(kvm.mm) if kvm is not None else None
    if host is not None:
        host.at_quiescence()
