"""systemd's service notifications (``sd_notify(3)``): readiness, reloads, stops, the watchdog.

With ``Type=notify`` in the unit (``deploy/systemd/cachegate.service``), ``systemctl start``
returns once cachegate answers (every worker ready), not when its process exists; a
``systemctl reload`` issued meanwhile waits for that instead of reaching a process whose
signal handlers are not installed yet; ``RELOADING=1`` … ``READY=1`` brackets a reload (with
``Type=notify-reload``, systemd ≥ 253, ``systemctl reload`` waits for it to end and the unit
needs no ``ExecReload``); ``STATUS=`` is the line ``systemctl status`` shows; and with
``WatchdogSec=`` the main process pings from its event loop, so a stuck loop gets the service
restarted. Only the main process (the supervisor, or the one serving process) notifies: the
variables are taken out of its environment, so workers never inherit them.

Hand-written rather than a dependency: the protocol is one datagram on a Unix socket
(python-systemd needs libsystemd's headers to build; ``sdnotify`` on PyPI is these same
twenty lines, unmaintained since 2019).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("cachegate.systemd")

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Messages to the service manager; every method does nothing when none listens."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address  # a filesystem path, or "\0name" (Linux abstract namespace)
        self.watchdog_usec = watchdog_usec
        self._failed = False  # the first failure is logged, not every watchdog ping's

    @classmethod
    def take(cls) -> Notifier:
        """The notifier this process's environment asks for, removing its variables from the
        environment (``sd_notify``'s ``unset_environment``): the workers this process starts
        must not notify in its name."""
        raw = {name: os.environ.pop(name, None) for name in ENVIRONMENT}
        address = raw["NOTIFY_SOCKET"] or None
        if address is not None:
            if address.startswith("@"):
                address = "\0" + address[1:]
            elif not address.startswith("/"):  # vsock:… (a VM's manager): not supported
                log.warning("NOTIFY_SOCKET=%s: only Unix sockets are supported; not notifying", address)
                address = None
        watchdog = None
        pid = raw["WATCHDOG_PID"]
        if raw["WATCHDOG_USEC"] and (not pid or pid == str(os.getpid())):
            try:
                watchdog = int(raw["WATCHDOG_USEC"]) or None
            except ValueError:
                log.warning("WATCHDOG_USEC=%s is not a number of microseconds; no watchdog pings",
                            raw["WATCHDOG_USEC"])
        return cls(address, watchdog)

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when none was sent. Never blocks: a
        manager whose queue is full loses the message (the next ping or status follows)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager at %s: %s",
                            self.address.replace("\0", "@"), exc.strerror or exc)
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: systemd (≥ 253) pairs it with the reload it asked for.
        return self.send("RELOADING=1", "STATUS=reloading the configuration",
                         f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self, serving: str, problems: list[str]) -> bool:
        """READY=1 again after a reload, saying how it went (a rejected reload keeps serving)."""
        when = time.strftime("%H:%M:%S", time.localtime())
        if problems:
            return self.ready(f"{serving}; reload at {when} rejected: {problems[0]}")
        return self.ready(f"{serving}; configuration reloaded at {when}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping: finishing in-flight requests")

    async def keep_watchdog(self) -> None:
        """Ping every half of ``WATCHDOG_USEC`` from the event loop (run as a task until the
        process exits): a loop stuck for longer misses it, and systemd restarts the service."""
        if self.watchdog_usec is None or self.address is None:
            return
        interval = self.watchdog_usec / 2e6
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)


def _one_line(text: str) -> str:
    return " ".join(text.split())
