"""The network interface that reaches the rendezvous host, for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.

gloo and NCCL otherwise take the address this machine's hostname resolves to; on many clusters (and the
test cluster) that is 127.0.0.1, and peers on other hosts then connect to their own loopback. The route to
the rendezvous host (MASTER_ADDR) names the right interface, whatever the default route or a management
network looks like. `python -m cityseg.distributed.netif HOST` prints it; CITYSEG_SOCKET_IFNAME overrides the choice.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

OVERRIDE_ENV = "CITYSEG_SOCKET_IFNAME"
SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address


class InterfaceError(RuntimeError):
    """A one-line reason no interface could be chosen."""


def interface_addresses() -> dict[str, str]:
    """{interface name: IPv4 address} of the interfaces that have one."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(reply[20:24])
    return found


def source_address_towards(host: str) -> str:
    """The local address the kernel's routing table uses to reach host (a UDP connect sends nothing)."""
    try:
        target = socket.gethostbyname(host)
    except OSError as err:
        raise InterfaceError(f"rendezvous host {host!r} does not resolve ({err.strerror})") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 9))
        except OSError as err:
            raise InterfaceError(f"no route to rendezvous host {host} ({target}): {err.strerror}") from None
        return probe.getsockname()[0]


def interface_towards(host: str) -> str:
    """The interface holding the address that routes to host; CITYSEG_SOCKET_IFNAME wins if set."""
    addresses = interface_addresses()
    chosen = os.environ.get(OVERRIDE_ENV)
    if chosen:
        if chosen not in addresses:
            raise InterfaceError(f"{OVERRIDE_ENV}={chosen}: no such interface with an IPv4 address on "
                                 f"{socket.gethostname()} (have: {', '.join(sorted(addresses))})")
        return chosen
    source = source_address_towards(host)
    for name, address in addresses.items():
        if address == source:
            return name
    raise InterfaceError(f"no interface holds {source}, the address that routes to {host}; set {OVERRIDE_ENV}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cityseg.distributed.netif RENDEZVOUS_HOST", file=sys.stderr)
        return 2
    try:
        print(interface_towards(argv[0]))
    except InterfaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
