"""``cachegate top``: a terminal view of a running cachegate, like varnishstat or htop.

It reads the admin API (``GET /console/api/live``, the numbers behind the web
console, and ``GET /cluster`` when the proxy has it) with the admin token from
``CACHEGATE_ADMIN_TOKEN`` (or ``--config``'s ``admin.token``), and redraws the
whole screen in place every ``--interval`` seconds with plain ANSI sequences (the
alternate screen, cursor home, erase to end of line): requests per second by
cache status with latency percentiles, hit ratio and origin offload, fills,
evictions, memory and disk against their budgets, top URLs with their hit ratio,
upstream health and the reasons responses were not stored. ``q`` quits (so does
Ctrl-C), and the terminal is restored as it was.

Not on a terminal (a pipe, a file), it prints one plain frame every interval;
``--once`` prints a single frame and exits (for scripts and documentation).

``render`` is pure (the live JSON in, lines out), so tests check it without a
terminal; the terminal handling is a thin loop around it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from proxy.admin_client import AdminAPI, AdminClientError, NotAdminEndpoint
from proxy.shown import same_width

STATUS_ORDER = ("HIT", "STALE", "UPDATING", "REVALIDATED", "EXPIRED", "MISS", "BYPASS", "ERROR")
RATE_WINDOW = 5  # seconds the requests/s figures average over
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENTER = "\x1b[?1049h\x1b[?25l"  # the alternate screen, cursor hidden
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
EOL = "\x1b[K"
EOS = "\x1b[J"


@dataclass(frozen=True)
class TopOptions:
    admin: str
    token: str | None
    interval: float = 1.0
    top: int = 10


# -- the screen (pure) ----------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _shown(text: str) -> str:
    """``text`` with what a terminal would act on rather than show (C0 and C1 controls such as
    ESC or U+009B, bidi overrides) replaced by U+FFFD, one for one (``proxy.shown.same_width``):
    URLs, reasons and names come from clients and origins, and must not move the cursor or
    recolour the operator's screen."""
    return same_width(text)


def _url_cell(url: str, width: int) -> str:
    """A URL shortened from the middle, so both host and end of path stay readable."""
    if len(url) <= width:
        return url.ljust(width)
    keep = max(1, width - 1)
    head = keep // 2
    return url[:head] + "…" + url[len(url) - (keep - head):]


def rates(points: list[dict[str, Any]], seconds: int = RATE_WINDOW) -> tuple[dict[str, float], float]:
    """Requests per second by cache status over the last ``seconds`` points, and in total."""
    recent = points[-seconds:]
    span = sum(p["dt"] for p in recent)
    if span <= 0:
        return {}, 0.0
    by: dict[str, float] = {}
    for p in recent:
        for status, n in p["requests"].items():
            by[status] = by.get(status, 0.0) + n
    return {k: v / span for k, v in by.items()}, sum(by.values()) / span


def render(live: dict[str, Any], points: list[dict[str, Any]], admin: str, width: int, height: int,
           cluster: dict[str, Any] | None = None, error: str | None = None, clock: str = "") -> list[str]:
    """The screen for one refresh: at most ``height`` lines of at most ``width`` characters."""
    lines: list[str] = []
    workers = f", {live['workers']} workers" if live.get("workers") else ""
    head = f"cachegate top — {admin} — up {_duration(live.get('uptime_seconds', 0))}{workers}"
    lines.append(head + clock.rjust(max(1, width - len(head))) if clock else head)
    if error:
        lines.append(f"! {error}")
    by_status, total = rates(points)
    minute, start = live["last_minute"], live["since_start"]
    lines.append(f"requests/s {total:,.1f}   hit ratio {_pct(minute.get('hit_ratio'))} last minute, "
                 f"{_pct(start.get('hit_ratio'))} since start   origin offload "
                 f"{_pct(minute.get('request_offload'))} of requests, "
                 f"{_pct(minute.get('byte_offload'))} of bytes")
    seconds = minute.get("seconds") or 0
    fills = minute.get("fills", 0) / seconds if seconds else 0.0
    storage = live.get("storage", {})
    tiers = []
    for name in ("memory", "disk"):
        tier = storage.get(name)
        if tier:
            share = tier["bytes"] / tier["budget"] if tier.get("budget") else 0.0
            tiers.append(f"{name} {_bytes(tier['bytes'])} / {_bytes(tier['budget'])} ({share:.1%}), "
                         f"{tier['entries']:,} entries")
    lines.append(f"fills/s {fills:.1f}   evictions {minute.get('evictions', 0)} last minute")
    lines.append("   ".join(tiers))
    lines.append("")

    latency = live.get("latency", {})
    statuses = [s for s in STATUS_ORDER if s in by_status or s in latency]
    statuses += sorted((set(by_status) | set(latency)) - set(STATUS_ORDER))
    lines.append(f"{'STATUS':<12}{'REQ/S':>10}{'SHARE':>9}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}")
    for status in statuses:
        rate = by_status.get(status, 0.0)
        lat = latency.get(status, {})
        share = rate / total if total else 0.0
        lines.append(f"{status:<12}{rate:>10,.1f}{share:>9.1%}{_ms(lat.get('p50')):>10}"
                     f"{_ms(lat.get('p90')):>10}{_ms(lat.get('p99')):>10}")
    if not statuses:
        lines.append("(no requests yet)")
    lines.append("")

    upstreams = live.get("upstreams", [])
    lines.append(f"{'UPSTREAM':<36}{'STATE':<16}{'IN FLIGHT':>10}{'REQUESTS':>10}{'FAILURES':>10}")
    for u in upstreams:
        state = "up" if u.get("available") else "DOWN"
        if u.get("workers"):
            state += f" {u.get('workers_available', 0)}/{u['workers']} wk"
        lines.append(f"{_url_cell(str(u['url']), 35)} {state:<16}{u.get('in_flight', 0):>10}"
                     f"{u.get('requests', 0):>10,}{u.get('failures', 0):>10,}")
    if cluster and cluster.get("nodes"):  # GET /cluster: lag is purges not yet applied
        lines.append("")
        lines.append(f"{'NODE':<36}{'STATE':<16}{'LAG (PURGES)':>13}")
        for node in cluster["nodes"]:
            name = str(node.get("node") or node.get("name") or "?")
            if name == cluster.get("node"):
                name += " (this node)"
            lag = node.get("lag")
            lag_text = "–" if lag is None else str(lag)
            lines.append(f"{_url_cell(name, 35)} {node.get('state') or '?':<16}{lag_text:>13}")
    lines.append("")

    url_width = max(20, min(80, width - 24))
    lines.append(f"{'TOP URLS (last 1-2 min)':<{url_width}}{'REQUESTS':>12}{'HIT RATIO':>11}")
    for row in live.get("top_urls", []):
        ratio = _pct(row.get("hit_ratio"))
        lines.append(f"{_url_cell(row['url'], url_width)}{row['requests']:>12,}{ratio:>11}")
    if not live.get("top_urls"):
        lines.append("(none yet)")
    lines.append("")
    reasons = live.get("not_stored", [])
    if reasons:
        lines.append(f"{'NOT STORED':<28}{'COUNT':>8}  EXAMPLE")
        for r in reasons:
            lines.append(f"{_fit(r['reason'], 27):<28}{r['count']:>8,}  {r['example']}")
        lines.append("")
    body = [_fit(_shown(line), width) for line in lines]
    footer = "q quit"
    if len(body) >= height:
        body = body[: max(0, height - 1)]
    return [*body, footer]


def plain(text: str) -> str:
    """``text`` without ANSI sequences (what a terminal shows of it)."""
    return ANSI.sub("", text)


# -- the I/O --------------------------------------------------------------------------------------


class Feed:
    """Polls the admin API, keeping the points it has seen (only new ones are asked for)."""

    def __init__(self, options: TopOptions) -> None:
        self.options = options
        # One for the whole run: the admin listener is checked once, before the token is sent.
        self.api = AdminAPI(options.admin, options.token, max(2.0, options.interval * 2))
        self.points: list[dict[str, Any]] = []
        self.seq = 0
        self.instance: str | None = None  # the id of the admin process the points came from
        self.live: dict[str, Any] | None = None
        self.cluster: dict[str, Any] | None = None
        self._cluster_at = 0.0
        self._has_cluster = True

    def _get(self, path: str) -> Any:
        text = self.api.call("GET", path, None)
        try:
            return json.loads(text)
        except ValueError:
            raise AdminClientError(f"the admin API at {self.options.admin} answered {path.split('?')[0]} "
                                   f"with something that is not JSON: '{text[:60]}'", keep="") from None

    def poll(self) -> None:
        """One refresh; AdminClientError (the state kept as it was) when the admin API cannot be
        reached, does not answer in time, or answers something that is not the live feed."""
        live = self._get(f"/console/api/live?since={self.seq}&top={self.options.top}")
        try:
            seq = live["seq"]
            if not isinstance(seq, int):
                raise TypeError(f"seq is {type(seq).__name__}, not a number")
            points = self.points
            instance = live.get("instance")
            if (self.instance is not None and instance != self.instance) or seq < self.seq:
                # cachegate restarted: its points do not continue those held (a restart whose
                # counter had already passed ours was spliced onto them), and since=<old seq> left
                # out the new process's first ones. Start over from all of the new process's.
                live = self._get(f"/console/api/live?since=0&top={self.options.top}")
                seq = live["seq"]
                if not isinstance(seq, int):
                    raise TypeError(f"seq is {type(seq).__name__}, not a number")
                instance = live.get("instance")
                points = []
            known = {p["seq"] for p in points}
            points = (points + [p for p in live["points"] if p["seq"] not in known])[-600:]
            render(live, points, self.options.admin, 120, 200, self.cluster)  # every field it reads
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:80]}"
            raise AdminClientError(f"the admin API at {self.options.admin} answered something that is "
                                   f"not cachegate's live feed ({why})", keep="") from None
        self.points = points
        self.seq = seq
        self.instance = instance if isinstance(instance, str) else None
        self.live = live
        if self._has_cluster and time.monotonic() - self._cluster_at > 5:
            self._cluster_at = time.monotonic()
            try:
                cluster = self._get("/cluster")
                render(live, self.points, self.options.admin, 120, 200, cluster)
            except AdminClientError as exc:
                if str(exc).startswith("404"):
                    self._has_cluster = False  # this cachegate has no cluster view
                cluster = None
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                cluster = None  # not a cluster view top can show: shown without it
            self.cluster = cluster


@contextlib.contextmanager
def terminal(fd: int) -> Iterator[None]:
    """Keys without Enter (cbreak), the alternate screen; everything restored afterwards."""
    saved = termios.tcgetattr(fd)
    out = sys.stdout
    try:
        tty.setcbreak(fd)
        out.write(ENTER)
        out.flush()
        yield
    finally:
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _frame(feed: Feed, error: str | None, size: os.terminal_size) -> list[str]:
    if feed.live is None:
        return [f"cachegate top — {feed.options.admin}", f"! {_shown(error)}" if error else "connecting…",
                "q quit"]
    return render(feed.live, feed.points, feed.options.admin, size.columns, size.lines, feed.cluster, error,
                  time.strftime("%H:%M:%S"))


def run_top(options: TopOptions, once: bool = False, out: IO[str] = sys.stdout) -> int:
    """The loop: poll, draw, wait for a key or the next refresh. Exit status 0, or 1 when the
    admin API refuses the token, when the address is not the admin listener's (``AdminAPI``),
    or when it cannot be reached for ``--once``."""
    feed = Feed(options)
    interactive = not once and out.isatty() and sys.stdin.isatty()
    if not interactive:
        return _run_plain(feed, once, out)
    stdin = sys.stdin.fileno()
    with terminal(stdin):
        while True:
            error = None
            try:
                feed.poll()
            except AdminClientError as exc:
                if str(exc).startswith("401") or isinstance(exc, NotAdminEndpoint):
                    out.write(LEAVE)
                    hint = "" if isinstance(exc, NotAdminEndpoint) else "; set CACHEGATE_ADMIN_TOKEN"
                    print(f"cachegate top: {exc}{hint}", file=sys.stderr)
                    return 1
                error = str(exc)
            size = shutil.get_terminal_size()
            lines = _frame(feed, error, size)
            out.write(HOME + "".join(line + EOL + "\r\n" for line in lines[:-1]) + lines[-1] + EOL + EOS)
            out.flush()
            deadline = time.monotonic() + options.interval
            while (left := deadline - time.monotonic()) > 0:
                try:
                    ready, _, _ = select.select([stdin], [], [], left)
                except InterruptedError:
                    continue
                if ready:
                    key = os.read(stdin, 32)
                    if not key or b"q" in key.lower():
                        return 0


def _run_plain(feed: Feed, once: bool, out: IO[str]) -> int:
    size = os.terminal_size((120, 200))
    while True:
        try:
            feed.poll()
        except AdminClientError as exc:
            print(f"cachegate top: {exc}", file=sys.stderr)
            if once or str(exc).startswith("401") or isinstance(exc, NotAdminEndpoint):
                return 1
        if feed.live is not None:
            out.write("\n".join(_frame(feed, None, size)[:-1]) + "\n")
            out.flush()
        if once:
            return 0
        out.write("\n")
        time.sleep(feed.options.interval)


def main(options: TopOptions, once: bool) -> int:
    # Ctrl-C quits as q does (the terminal is restored by the context manager).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_top(options, once)
    except KeyboardInterrupt:
        return 0


__all__ = ["TopOptions", "main", "plain", "render"]
