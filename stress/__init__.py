"""The bundled scenarios: one race per module, registered with @asyncvm.scenario on import."""

from . import (  # noqa: F401
    fault_vs_attribute_flip,
    gmem_release_vs_memslot_delete,
    prefault_vs_memslot_delete,
    prefault_vs_munmap,
    prefault_vs_punch_hole,
    snp,
    snp_faults,
    tdx,
    tdx_overlap,
)
