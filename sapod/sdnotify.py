"""systemd's notify protocol (sd_notify), without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``. Messages are
``KEY=VALUE`` lines sent as one datagram. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import socket

from sapod.logs import get_logger


class Notifier:
    def __init__(self, address: str | None):
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Sent from the event loop: a receiver that stops reading (its queue can be
                # as short as 10 datagrams) must cost a dropped message, never a stalled loop.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), target)
            return True
        except OSError as exc:
            if not self._warned:  # a missing socket must not fill the log
                self._warned = True
                get_logger().warning("notify_failed", socket=self.address, error=str(exc))
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
