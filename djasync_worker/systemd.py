"""Speak systemd's notify protocol (``Type=notify``) with plain socket code."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class Notifier:
    """Send ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1`` to ``$NOTIFY_SOCKET``.

    Does nothing when the daemon does not run under systemd (no ``NOTIFY_SOCKET``).
    """

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None.
        self.watchdog_interval = int(usec) / 2e6 if watched and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal for the daemon
            logger.debug("sd_notify failed message=%r error=%s", message, exc)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")
