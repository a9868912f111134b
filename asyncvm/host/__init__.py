"""The host side: physical pages (pfns, folios, refcounts) and the VMM's address space."""
