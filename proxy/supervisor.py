"""Multi-worker mode: N processes on one port (SO_REUSEPORT) sharing the disk tier."""

from __future__ import annotations

from proxy.config import Overrides, Settings


def supervise(settings: Settings, config_path: str | None, overrides: Overrides,
              use_uvloop: bool = True) -> int:
    raise SystemExit("cachegate: --workers > 1 is not available yet")
