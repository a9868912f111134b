"""An async TDX launcher on the emulated /dev/kvm: the VMM side of building a Trust Domain.

It does what a VMM does to launch a TD, on anyio (asyncio or trio): create the TD and its vCPUs,
load a generated firmware image of a few MiB into private memory with KVM_TDX_INIT_MEM_REGION and
measurement (one section per vCPU fd, in image order so that MRTD is reproducible), re-issue
what an -EINTR/-EAGAIN left undone, finalize from a task of its own, pre-fault the rest of memory
from all vCPUs in parallel, run the vCPUs and print the MRTD. The launcher itself is
``asyncvm.scenarios.tdx_launcher.Launcher``: the bundled ``tdx_launcher`` scenario runs the same
code under the controlled scheduler to hunt races in it (try ``asyncvm stress tdx_launcher -p
finalize_early=1``, the launcher's deliberate bug).

    python examples/tdx_launcher.py --backend trio
"""

from __future__ import annotations

import argparse

import anyio

import asyncvm
from asyncvm.scenarios.tdx_launcher import Launcher, expected_mrtd, firmware_image

MIB_PAGES = (1 << 20) // asyncvm.uapi.PAGE_SIZE


async def launch(vcpus: int = 4, firmware_mib: float = 2, memory_mib: float = 4) -> list[str]:
    """Launch one TD; return the report lines (the same on every backend)."""
    image = firmware_image(int(firmware_mib * MIB_PAGES), sections=4)
    launcher = Launcher(asyncvm.Kvm(), image, vcpus=vcpus, memory_pages=int(memory_mib * MIB_PAGES))
    td = await launcher.launch()
    measured = sum(s.pages for s in image if s.measured)
    lines = [
        f"TD launched: {vcpus} vCPUs, {len(image)} firmware sections ({measured} pages measured), "
        f"{launcher.memory_pages} pages of private memory",
    ]
    for name, reads in td.reads.items():
        lines.append(f"{name}: firmware starts {reads[0].hex()}, own memory reads back {reads[-1]!r}")
    lines.append(f"MRTD: {td.mrtd.hex()}")
    lines.append(f"MRTD matches the image's reference measurement: {td.mrtd == expected_mrtd(image)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--firmware-mib", type=float, default=2)
    parser.add_argument("--memory-mib", type=float, default=4)
    args = parser.parse_args(argv)
    lines = anyio.run(launch, args.vcpus, args.firmware_mib, args.memory_mib, backend=args.backend)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
