"""The ``cachegate`` command: run, check, explain, purge, warm, top, health, demo.

Every subcommand validates the config the same way; a bad config exits 2 with
one ``FILE:LINE: message`` line per problem, before any port is bound.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from proxy import __version__
from proxy.config import Overrides
from proxy.errors import ConfigError, UnsetTokenVariable
from proxy.startup import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    load_settings,
    log_as_configured,
    raise_open_files,
    run_async,
    start_logging,
)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="FILE", help="YAML config file")


def _add_run_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="client listener, repeatable (plain HTTP; replaces the config's listen:)")
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="upstream URL, repeatable (overrides upstreams:)")
    p.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener, or 'off'")
    p.add_argument("--workers", metavar="N", help="worker processes, or 'auto' for one per CPU")
    p.add_argument("--log-level", default=os.environ.get("CACHEGATE_LOG_LEVEL", "info"),
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(listen=tuple(args.listen), upstreams=tuple(args.upstream),
                     admin_listen=args.admin_listen, workers=args.workers)


def cmd_check(args: argparse.Namespace) -> int:
    """Problems exit 2; warnings are printed (``FILE:LINE: warning: ...``) and exit 0, or 2
    with ``--strict`` (for CI)."""
    settings = load_settings(args.config, Overrides(), warn=True, names=not args.no_lookup)
    if settings is None:
        return EXIT_CONFIG
    rules = settings.rules
    warned = f", {len(settings.warnings)} warning(s)" if settings.warnings else ""
    if settings.warnings and args.strict:
        print(f"{args.config}: {len(settings.warnings)} warning(s), refused by --strict", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: OK ({len(settings.upstreams)} upstream(s), {len(rules.rules)} rule(s) "
          f"from {len(rules.files)} file(s){warned})")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import time

    from proxy.explain import ExplainRequest, explain, parse_header

    try:  # a field no client could send: a usage error, as the admin API's /explain refuses it
        headers = tuple(parse_header(h, "-H") for h in args.header)
        response_headers = tuple(parse_header(h, "-R") for h in args.response_header)
    except ValueError as exc:
        print(f"cachegate explain: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    settings = load_settings(args.config, Overrides(), machine="no")
    if settings is None:
        return EXIT_CONFIG
    try:
        req = ExplainRequest(url=args.url, method=args.method, headers=headers,
                             statuses=tuple(args.status) or (200,), response_headers=response_headers,
                             max_head=settings.max_request_head)
        lines = explain(settings.rules, req, time.time(), show_all=not args.brief)
    except ValueError as exc:
        print(f"cachegate explain: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(lines))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    """Call ``POST /purge`` on the admin API; print its JSON answer, or its error and exit 1."""
    from proxy.admin_client import AdminAPI, AdminClientError
    from proxy.shown import shown

    spec: dict[str, Any] = {}
    if args.urls:
        spec["urls"] = args.urls
    if args.tag:
        spec["tags"] = args.tag
    if args.prefix:
        spec["prefixes"] = args.prefix
    if args.all:
        spec["all"] = True
    if not spec:
        print("cachegate purge: give URLs, --tag, --prefix or --all", file=sys.stderr)
        return EXIT_CONFIG
    if args.soft:
        spec["soft"] = True
    where = _admin_of(args, "purge")
    if isinstance(where, int):
        return where
    base, token = where
    try:
        answer = AdminAPI(base, token, args.timeout).call("POST", "/purge", spec)
    except AdminClientError as exc:
        print(f"cachegate purge: {_unreachable(args, str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    if not _purge_result(answer):
        # The admin listener's own answer, but not a purge's result: nothing is known to be purged.
        print(f"cachegate purge: the admin API at {shown(base)} answered POST /purge with something "
              f'that is not a purge\'s result (a JSON object with "purged" and "soft"): '
              f'"{shown(answer.strip()[:80], keep="")}"; nothing is known to be purged', file=sys.stderr)
        return EXIT_FAILURE
    # The server's answer: a terminal control in it is printed escaped; it is JSON, which writes
    # its own backslashes as \\ already.
    print(shown(answer, backslash=False))
    missing = _missing_nodes(answer)
    if missing:
        # Cluster mode, 202: the purge is made, but not yet everywhere.
        print(f"cachegate purge: not acknowledged within cluster.ack_timeout by {shown(', '.join(missing))} "
              "(they apply it once they read the cluster's purge stream; GET /cluster shows them)",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _purge_result(answer: str) -> bool:
    """Whether ``answer`` is what POST /purge answers: ``{"purged": N, "soft": BOOL, ...}``."""
    import json

    try:
        result = json.loads(answer, strict=False)  # (a control in a string is shown escaped)
    except ValueError:
        return False
    return (isinstance(result, dict) and type(result.get("purged")) is int
            and isinstance(result.get("soft"), bool))


def _missing_nodes(answer: str) -> list[str]:
    import json

    try:
        missing = json.loads(answer).get("missing") or []
    except (ValueError, AttributeError):
        return []
    return [str(n) for n in missing]


def _rate(text: str) -> float:
    value = text.strip().lower().removesuffix("/s")
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"takes a number of requests a second above 0, such as 50 or 50/s, "
                                         f"not {text!r}")
    return rate


def _seconds(text: str, most: float = math.inf, example: str = "30") -> float:
    """An argparse type: a number of seconds above 0 (and at most ``most``)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= most):
        upto = "" if most == math.inf else f" and up to {most:g}"
        raise argparse.ArgumentTypeError(f"takes a number of seconds above 0{upto}, such as {example} or "
                                         f"0.5, not {text!r}")
    return seconds


def _admin_url(text: str) -> str:
    """An argparse type: the admin API's URL, http(s)://HOST[:PORT] (a typo is a usage error
    here, not a traceback or a connection error from the HTTP client)."""
    from urllib.parse import urlsplit

    try:
        split = urlsplit(text)
        split.port  # noqa: B018 (ValueError: a port out of range, or not a number)
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        split = urlsplit("")
    if (split.scheme not in ("http", "https") or not split.hostname
            or any(c <= " " or c == "\x7f" for c in text)):
        raise argparse.ArgumentTypeError(f"takes the admin API's URL, such as http://127.0.0.1:8081, "
                                         f"not {text!r}")
    return text


def _call_timeout(text: str) -> float:
    """``--timeout`` of an admin call: seconds above 0, at most a day (a socket's timeout has
    a limit of its own)."""
    return _seconds(text, 86400)


def _interval(text: str) -> float:
    """``cachegate top --interval``: seconds above 0, at most an hour."""
    return _seconds(text, 3600, "1")


def _whole(least: int, most: int | None = None) -> Any:
    """An argparse type: a whole number of at least ``least`` (and at most ``most``)."""

    def whole(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least or (most is not None and n > most):
            within = f"of {least} or more" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"takes a whole number {within}, not {text!r}")
        return n

    return whole


# Bytes of one line of a URL list or an access log: no URL or log line is that long. A file
# without line ends (a binary given by mistake) was read whole, as one line.
MAX_SOURCE_LINE = 1 << 20
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SourceError(Exception):
    """A ``--urls`` or ``--from-access-log`` source that cannot be read as lines (its message)."""


def _source_lines(name: str, what: str = "a list of URLs, one a line") -> Iterator[bytes]:
    """A URL list's (or an access log's) lines as bytes, read as a stream (``-``: standard
    input): whether one is UTF-8 is ``url_lines``' to say, at its line. A line ends at CR LF,
    LF or a lone CR (a list saved by an old Mac editor: read by LF alone, its URLs were one URL
    with %0D in it, warmed as a key no client asks for). ``SourceError`` for a path that is
    neither a regular file nor a FIFO or pipe (``yamlsrc.open_regular``: a directory, a device
    such as /dev/zero, which was read until memory ran out, a socket), one that cannot be read,
    and a line over ``MAX_SOURCE_LINE`` bytes."""
    if name == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream put in its place (a test's StringIO)
            yield from sys.stdin.read().encode("utf-8", "surrogateescape").splitlines()
            return
        yield from _lines_of(buffer, "<stdin>", what)
        return
    from proxy.yamlsrc import NotRegularFile, open_regular

    try:
        f = open_regular(name, fifo=True)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(f"{name} does not exist") from None
    except NotRegularFile as exc:  # "is a directory", "is not a regular file (a device)"
        raise SourceError(f"{name} {exc.strerror}: give {what}") from None
    except OSError as exc:
        raise SourceError(f"cannot read {name}: {exc.strerror or exc}") from None
    with f:
        yield from _lines_of(f, name, what)


def _lines_of(f: BinaryIO, name: str, what: str) -> Iterator[bytes]:
    pending = b""
    number = 0
    while True:
        try:
            chunk = f.read(1 << 16)
        except OSError as exc:
            raise SourceError(f"cannot read {name}: {exc.strerror or exc}") from None
        data = pending + chunk
        start = 0
        for end in _LINE_END.finditer(data):
            if chunk and end.end() == len(data) and end.group() == b"\r":
                break  # a CR at the end of what was read: its LF may come next
            number += 1
            yield data[start:end.start()]
            start = end.end()
        pending = data[start:]
        if len(pending) > MAX_SOURCE_LINE:
            raise SourceError(f"{name}:{number + 1}: a line of over {MAX_SOURCE_LINE >> 20} MiB (no URL "
                              f"or log line is that long): give {what}")
        if not chunk:
            if pending:
                yield pending
            return


def cmd_warm(args: argparse.Namespace) -> int:
    """Request URLs through the proxy to store them (``proxy.warm``); print the summary."""
    from proxy.admin_client import admin_url_of
    from proxy.warm import (
        EXIT_ERRORS,
        EXIT_INTERRUPTED,
        EXIT_USAGE,
        Outcome,
        Tally,
        Warmer,
        WarmError,
        WarmOptions,
        parse_access_log,
        parse_header,
        summary,
        targets_for,
        url_lines,
    )

    try:
        headers = [parse_header(h) for h in args.header]
        variants = [parse_header(v) for v in args.variants]
    except ValueError as exc:
        print(f"cachegate warm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.proxy:
        proxy = args.proxy
    elif args.config:
        from proxy.config import load_client_listeners

        # Only listen: is read (the rest, an admin token's unset ${VAR} say, is the service's).
        try:
            listeners = load_client_listeners(args.config)
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return EXIT_CONFIG
        # A plain listener if there is one; a wildcard listen address is reached on loopback.
        address, tls = next(((a, t) for a, t in listeners if not t), listeners[0])
        proxy = admin_url_of(address)
        if tls:
            proxy = "https" + proxy.removeprefix("http")
    else:
        proxy = "http://127.0.0.1:8080"
    options = WarmOptions(proxy=proxy, host=args.host, concurrency=args.concurrency, rate=args.rate or 0.0,
                          timeout=args.timeout, progress=args.progress,
                          progress_every=max(0.1, args.progress_interval))
    try:
        warmer = Warmer(options)
        for sitemap in args.sitemap:
            try:
                warmer.check(sitemap)
            except WarmError as exc:
                raise WarmError(f"--sitemap {sitemap!r}: {exc}") from None
    except WarmError as exc:
        print(f"cachegate warm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    urls: list[str] = []
    refused: list[tuple[Outcome, str]] = []  # lines and logged paths that cannot be sent: errors
    reading = time.monotonic()
    try:
        for name in args.urls:
            urls += url_lines(_source_lines(name), "<stdin>" if name == "-" else name, warmer.check, refused)
        for name in args.from_access_log:
            lines = _source_lines(name, "an access log, one request a line")
            logged = parse_access_log((line.decode("utf-8", "replace") for line in lines), refused)
            urls += warmer.sendable(logged, refused)
    except SourceError as exc:
        print(f"cachegate warm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C while a source is read (a FIFO, a pipe, a terminal that waits for lines): before
        # ``Warmer.run`` takes SIGINT, so the summary so far (nothing sent) and 130, as after.
        tally = Tally(total=0)
        for outcome, url in refused:
            tally.refuse(outcome, url)
        print("\n".join(summary(tally, time.monotonic() - reading, proxy, True)), flush=True)
        return EXIT_INTERRUPTED
    if not urls and not args.sitemap and not refused:
        print("cachegate warm: nothing to warm: give --sitemap URL, --urls FILE (- for stdin) or "
              "--from-access-log FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        tally, seconds, interrupted = run_async(
            warmer.run(lambda found: targets_for([*found, *urls], headers, variants), args.sitemap, refused))
    except WarmError as exc:
        print(f"cachegate warm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(summary(tally, seconds, proxy, interrupted)), flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    if tally.error_count > args.max_errors:
        print(f"cachegate warm: {tally.error_count} errors, more than --max-errors {args.max_errors}",
              file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


def _admin_of(args: argparse.Namespace, command: str) -> tuple[str, str | None] | int:
    """The admin API's address and token: --admin, else --config's admin.listen (its token too),
    else http://127.0.0.1:8081; the token from CACHEGATE_ADMIN_TOKEN first. An exit status on error."""
    from proxy.admin_client import admin_url_of
    from proxy.policy.fields import unsendable

    token = os.environ.get("CACHEGATE_ADMIN_TOKEN") or None
    problem = unsendable(token) if token else None
    if problem is not None:  # (not the URL's fault, as urllib's "Invalid header value" read)
        print(f"cachegate {command}: CACHEGATE_ADMIN_TOKEN {problem}, which no client can send in an "
              "Authorization field; remove it (a secret file written with echo ends with a newline)",
              file=sys.stderr)
        return EXIT_CONFIG
    if args.admin:
        return args.admin, token
    if args.config:
        from proxy.config import load_admin_access

        try:
            admin = load_admin_access(args.config, token=command != "health" and token is None)
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            if isinstance(exc, UnsetTokenVariable):
                print(f"cachegate {command}: admin.token of {args.config} names an environment variable "
                      "that is not set here (on a systemd host, perhaps only in the unit's EnvironmentFile): "
                      "set it, or give the token in CACHEGATE_ADMIN_TOKEN", file=sys.stderr)
            return EXIT_CONFIG
        if admin.listen is None:
            print(f"cachegate {command}: {args.config} has no admin listener (admin.listen); use --admin URL",
                  file=sys.stderr)
            return EXIT_CONFIG
        return admin_url_of(admin.listen), token or admin.token
    return "http://127.0.0.1:8081", token


def _unreachable(args: argparse.Namespace, error: str) -> str:
    """A failed call's message; with --config, a refused connection says where the address
    came from (admin.listen changes at a restart: an edit not yet applied points elsewhere)."""
    if args.admin or not args.config or "cannot reach the admin API" not in error:
        return error
    return (f"{error} (admin.listen of {args.config}; a change to it applies only once cachegate "
            "restarts: until then give --admin with the running listener's address)")


def cmd_top(args: argparse.Namespace) -> int:
    from proxy.top import TopOptions, main

    where = _admin_of(args, "top")
    if isinstance(where, int):
        return where
    return main(TopOptions(where[0], where[1], args.interval, args.top), args.once)


def cmd_health(args: argparse.Namespace) -> int:
    """GET /healthz on the admin API (a container HEALTHCHECK, an exec probe): exit 0 when it
    answers 200 with cachegate's ``{"status": "ok"}`` and is the admin listener's own answer
    (``admin_client.relayed``), else 1 with why. A URL that reaches another server (the client
    listener, passing /healthz on to an origin that may answer just as cachegate does) would
    otherwise report a healthy cachegate."""
    import json

    from proxy.admin_client import ADMIN_FIELD, AdminClientError, call_admin_answer, relayed
    from proxy.shown import shown

    where = _admin_of(args, "health")
    if isinstance(where, int):
        return where
    base = where[0]
    try:
        text, fields = call_admin_answer(base, "GET", "/healthz", None, None, timeout=args.timeout,
                                         own=False)
    except AdminClientError as exc:
        print(f"cachegate health: {_unreachable(args, str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    said = shown(text.strip()[:80], keep="")
    url = f"{shown(base.rstrip('/'))}/healthz"
    if isinstance(answer, dict) and answer.get("status") == "degraded" and relayed(fields) is None:
        # Serving, but in need of a restart (a damaged index): unhealthy, with why.
        print(f"cachegate health: degraded: {shown(str(answer.get('reason')), keep='')}", file=sys.stderr)
        return EXIT_FAILURE
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        print(f"cachegate health: {url} is not cachegate's admin endpoint: it "
              f'answered "{said}", not {{"status": "ok"}} (give the address of admin.listen, not the '
              "client listener's)", file=sys.stderr)
        return EXIT_FAILURE
    why = relayed(fields)
    if why is not None:
        older = (f"; a cachegate started before an upgrade to this version sends no {ADMIN_FIELD}: "
                 "restart it" if fields.get(ADMIN_FIELD) is None else "")
        print(f"cachegate health: {url} is not cachegate's admin endpoint: it answered "
              f'"{said}", but with {why} (the admin listener marks its answers with {ADMIN_FIELD}, '
              "the client listener adds X-Cache-Status and Cache-Status to what it relays): give "
              f"the address of admin.listen, not the client listener's or an origin's{older}",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.earlysignals import hold, ignore_at_exit

    # Already done by proxy.__main__ (``python -m proxy``, the console script) before the
    # imports; here for ``python -m proxy.cli`` and a direct call of main().
    hold()
    try:
        return _run(args)
    finally:
        # The loop's handlers were swapped for held ones before it closed (``held_at_end``);
        # from here the process only exits (docs/deploy.md: a SIGHUP while stopping is ignored).
        ignore_at_exit()


def _run(args: argparse.Namespace) -> int:
    start_logging(args.log_level)
    overrides = _overrides(args)
    settings = load_settings(args.config, overrides)
    if settings is None:
        return EXIT_CONFIG
    if settings.workers > 1:
        # This process becomes the supervisor: its lines from here on (the config's warnings
        # first) say so, as docs/logs.md promises, not "0" (a worker's, or a lone process's).
        from proxy.logs import setup_logging

        setup_logging(worker="supervisor")
    log_as_configured(settings)
    for warning in settings.warnings:
        logging.getLogger("cachegate.config").warning("%s", warning)
    raise_open_files()  # before the workers start: they inherit it
    if settings.workers > 1:
        from proxy.supervisor import supervise

        return supervise(settings, args.config, overrides, use_uvloop=not args.no_uvloop)
    from proxy.earlysignals import held_at_end
    from proxy.web.server import serve

    return run_async(held_at_end(serve(settings, args.config, overrides)), not args.no_uvloop)


def cmd_demo(args: argparse.Namespace) -> int:
    start_logging(args.log_level)
    from proxy.demo import prepare_demo, run_demo

    try:
        config, settings, note = prepare_demo(args.listen, args.admin_listen, args.origin_listen,
                                              args.rules, args.cache_dir)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_CONFIG
    try:
        return run_async(run_demo(settings, config, args.origin_listen, note), not args.no_uvloop)
    finally:
        if args.cache_dir is None:  # the demo's own temporary folder
            import shutil

            shutil.rmtree(os.path.dirname(config), ignore_errors=True)


def cmd_sample_origin(args: argparse.Namespace) -> int:
    from proxy.demo import run_origin

    return run_async(run_origin(args.listen), True)


def build_parser() -> argparse.ArgumentParser:
    from proxy.warm import MAX_CONCURRENCY
    parser = argparse.ArgumentParser(prog="cachegate", description="HTTP caching reverse proxy")
    parser.add_argument("--version", action="version", version=f"cachegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the proxy")
    _add_config_args(p)
    _add_run_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config and its rule files",
                       description="Prints each problem as FILE:LINE: message (exit 2) and each warning "
                                   "as FILE:LINE: warning: message (exit 0, unless --strict).")
    _add_config_args(p)
    p.add_argument("--strict", action="store_true", help="exit 2 when there are warnings too")
    p.add_argument("--no-lookup", action="store_true",
                   help="do not look the upstreams' names up (where the deployment's DNS is not: a CI "
                        "builder, an image build)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("explain", help="show the rule, cache key and TTL decision for a URL",
                       description="Why was this (not) cached? Shows which rule matches URL, the cache "
                                   "key, and what happens to a response of each --status.")
    _add_config_args(p)
    p.add_argument("url", metavar="URL", help="absolute URL as a client would request it")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="request header, repeatable (Cookie, Accept-Language, Cache-Control, ...)")
    p.add_argument("-X", "--method", default="GET", help="request method (default GET)")
    p.add_argument("--status", action="append", type=_whole(100, 599), default=[], metavar="N",
                   help="origin status to decide for, repeatable (default 200)")
    p.add_argument("-R", "--response-header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a header the origin would send, repeatable (default: none, i.e. no "
                        "freshness information)")
    p.add_argument("--brief", action="store_true", help="leave out the list of every rule")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("purge", help="purge URLs, tags, prefixes or everything through the admin API",
                       description="Calls POST /purge on the admin API (its address from --admin, or "
                                   "--config's admin.listen, else http://127.0.0.1:8081) with the "
                                   "token from CACHEGATE_ADMIN_TOKEN (or --config's admin.token), and "
                                   "prints the JSON answer. Exit 1 with the server's message on error.")
    p.add_argument("urls", nargs="*", metavar="URL", help="absolute URL: every variant of it is purged")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="purge every entry with this surrogate key, repeatable")
    p.add_argument("--prefix", action="append", default=[], metavar="URL",
                   help="purge every URL starting with this, repeatable")
    p.add_argument("--all", action="store_true", help="purge everything")
    p.add_argument("--soft", action="store_true",
                   help="mark stale instead of removing: served while one request revalidates")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--admin", metavar="URL", type=_admin_url,
                       help="admin API address, e.g. http://127.0.0.1:8081")
    where.add_argument("--config", "-c", metavar="FILE", help="take the admin address from this config")
    p.add_argument("--timeout", type=_call_timeout, default=60.0, metavar="SECONDS")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("health", help="exit 0 when the admin API's /healthz answers (for health checks)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", metavar="FILE", help="take the admin address from this config")
    where.add_argument("--admin", metavar="URL", type=_admin_url,
                       help="admin API address, e.g. http://127.0.0.1:8081")
    p.add_argument("--timeout", type=_call_timeout, default=3.0, metavar="SECONDS")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("warm", help="preload the cache: request URLs through the proxy",
                       description="Requests every URL of the sitemaps, URL files and access logs "
                                   "through the proxy (so rules, keys and coalescing apply) and "
                                   "prints what was stored, already fresh, served stale, not "
                                   "storable (and why) and the errors (a stale copy served because "
                                   "the origin failed is one). Exit 1 when errors exceed --max-errors, 130 "
                                   "after Ctrl-C (with the summary so far).")
    p.add_argument("--sitemap", action="append", default=[], metavar="URL",
                   help="a sitemap or sitemap index (nested sitemaps are followed), repeatable")
    p.add_argument("--urls", action="append", default=[], metavar="FILE",
                   help="a file of URLs or paths, one a line ('-': standard input), repeatable")
    p.add_argument("--from-access-log", action="append", default=[], metavar="FILE",
                   help="GET/HEAD requests of an access log (common, combined or cachegate's), "
                        "most requested first, repeatable")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--proxy", metavar="URL",
                       help="the proxy's client listener, its address alone (default: --config's "
                            "listen, else http://127.0.0.1:8080)")
    where.add_argument("--config", "-c", metavar="FILE", help="take the proxy's address from this config")
    p.add_argument("--host", metavar="HOST", help="the Host for paths (default: the proxy's address)")
    p.add_argument("--concurrency", type=_whole(1, MAX_CONCURRENCY), default=8, metavar="N",
                   help=f"requests at once (default 8, at most {MAX_CONCURRENCY})")
    p.add_argument("--rate", type=_rate, default=None, metavar="R/s",
                   help="at most R requests a second (default: no limit)")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a header for every request, repeatable (as curl's: a name given twice "
                        "sends both fields; 'NAME:' sends none)")
    p.add_argument("--variants", action="append", default=[], metavar="'NAME: VALUE'",
                   help="request each URL once per variant header, e.g. 'Accept-Encoding: gzip', "
                        "repeatable")
    p.add_argument("--max-errors", type=_whole(0), default=0, metavar="N",
                   help="exit 1 when there are more errors than this (default 0)")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="per request (default 30)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="a progress bar on a terminal, plain lines otherwise (auto)")
    p.add_argument("--progress-interval", type=_seconds, default=5.0, metavar="SECONDS",
                   help="seconds between plain progress lines (default 5)")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("top", help="a live terminal view of a running cachegate (q quits)",
                       description="Requests/s by cache status, hit ratio, offload, latency, storage, "
                                   "top URLs, upstreams and not-stored reasons, refreshed in place, "
                                   "from the admin API (token from CACHEGATE_ADMIN_TOKEN, or --config's "
                                   "admin.token). q or Ctrl-C quits.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--admin", metavar="URL", type=_admin_url,
                       help="admin API address, e.g. http://127.0.0.1:8081")
    where.add_argument("--config", "-c", metavar="FILE", help="take the admin address from this config")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="refresh every (default 1, at most 3600)")
    p.add_argument("--top", type=_whole(0, 200), default=10, metavar="N",
                   help="URLs and reasons listed (default 10, at most 200)")
    p.add_argument("--once", action="store_true", help="print one plain frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("demo", help="run a sample origin with cachegate in front of it")
    p.add_argument("--origin-listen", default="127.0.0.1:9000", metavar="HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    p.add_argument("--admin-listen", default="127.0.0.1:8081", metavar="HOST:PORT")
    p.add_argument("--rules", default="rules/default.yaml", metavar="FILE")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep the demo's cache (and its demo.yaml) here (default: an empty temporary folder)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-uvloop", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sample-origin", help="only the demo's sample origin (for deploy/compose.yaml)")
    p.add_argument("--listen", default="127.0.0.1:9000", metavar="HOST:PORT")
    p.set_defaults(func=cmd_sample_origin)
    return parser


# A command whose standard output was closed before it had written everything (``| head -1``):
# the status a shell gives a command killed by SIGPIPE (128 + 13), as coreutils' would end, so
# that ``set -o pipefail`` still sees that the output was cut short, without a traceback.
EXIT_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # what is still buffered: a reader gone shows here, not at exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return EXIT_PIPE
    return code


def _stdout_gone() -> bool:
    """After a BrokenPipeError: whether it was standard output's reader that left (a pipe or a
    socket; then it is pointed at /dev/null, as the Python docs recommend, so that the flush at
    exit does not print a second error), else False and the error is someone else's."""
    import stat

    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
