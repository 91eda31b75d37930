"""Separate hosts on one machine for the process-level deployment tests: network namespaces
joined by veth pairs (needs root and ``ip``).

``Star(spokes=5)`` is a hub namespace and one namespace per spoke; spoke ``i`` reaches the hub
only through its own veth pair on its own /30 (hub side ``10.77.<i>.1``, spoke side
``10.77.<i>.2``). Every namespace has its loopback up. ``Star.create`` raises
``NetnsUnavailable`` (with ``ip``'s message) where namespaces are not permitted, and
``Star.destroy`` removes whatever was created (deleting a namespace deletes its veth ends).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.77"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ``ip``, or not permitted)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


@dataclass
class Star:
    """A hub namespace and ``spokes`` namespaces, each joined to the hub by a veth pair."""

    spokes: int
    prefix: str = field(default_factory=lambda: f"pl{os.getpid()}{secrets.token_hex(2)}")
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def spoke(self, i: int) -> str:
        return f"{self.prefix}-c{i}"

    @staticmethod
    def hub_address(i: int) -> str:
        """The hub's address on spoke ``i``'s link (the address spoke ``i`` dials)."""
        return f"{SUBNET}.{i}.1"

    @staticmethod
    def spoke_address(i: int) -> str:
        return f"{SUBNET}.{i}.2"

    @classmethod
    def hub_addresses(cls, spokes: int) -> list[str]:
        return [cls.hub_address(i) for i in range(spokes)]

    @staticmethod
    def exec(namespace: str) -> list[str]:
        """The command prefix that runs a program inside ``namespace``."""
        return ["ip", "netns", "exec", namespace]

    def create(self) -> Star:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the ip command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        try:
            for ns in [self.hub, *(self.spoke(i) for i in range(self.spokes))]:
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for i in range(self.spokes):
                hub_if, spoke_if = f"veth{i}", "veth0"  # names are per namespace (<= 15 chars)
                _ip("link", "add", hub_if, "netns", self.hub, "type", "veth",
                    "peer", "name", spoke_if, "netns", self.spoke(i))  # fmt: skip
                for ns, dev, addr in (
                    (self.hub, hub_if, self.hub_address(i)),
                    (self.spoke(i), spoke_if, self.spoke_address(i)),
                ):
                    _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                    _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Delete every namespace this star created (their veth ends go with them)."""
        while self.created:
            subprocess.run(["ip", "netns", "del", self.created.pop()], capture_output=True)
