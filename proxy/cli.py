"""The ``cachegate`` command: run, check, explain, purge, demo (and the operator tools beside them).

Every subcommand validates the config the same way; a bad config exits 2 with
one ``FILE:LINE: message`` line per problem, before any port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

from proxy import __version__
from proxy.config import Overrides, Settings, load_config
from proxy.errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def run_async(coro: Coroutine[Any, Any, int], use_uvloop: bool = True) -> int:
    """Run on uvloop when it is importable (Linux), else on asyncio's default loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)
    return asyncio.run(coro)


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


def _load(path: str | None, overrides: Overrides) -> Settings | None:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _setup_logging(level: str) -> None:
    """One line per event on standard error (proxy.logs); JSON once a config asks for it."""
    from proxy.logs import setup_logging

    setup_logging(level)


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.config, Overrides())
    if settings is None:
        return EXIT_CONFIG
    rules = settings.rules
    print(f"{args.config}: OK ({len(settings.upstreams)} upstream(s), {len(rules.rules)} rule(s) "
          f"from {len(rules.files)} file(s))")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import time

    from proxy.explain import ExplainRequest, explain, parse_header

    settings = _load(args.config, Overrides())
    if settings is None:
        return EXIT_CONFIG
    try:
        req = ExplainRequest(
            url=args.url, method=args.method,
            headers=tuple(parse_header(h) for h in args.header),
            statuses=tuple(args.status) or (200,),
            response_headers=tuple(parse_header(h) for h in args.response_header),
        )
        lines = explain(settings.rules, req, time.time(), show_all=not args.brief)
    except ValueError as exc:
        print(f"cachegate explain: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(lines))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    """Call ``POST /purge`` on the admin API; print its JSON answer, or its error and exit 1."""
    from proxy.admin_client import AdminClientError, admin_url_of, call_admin

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
    token = os.environ.get("CACHEGATE_ADMIN_TOKEN") or None
    if args.admin:
        base = args.admin
    elif args.config:
        settings = _load(args.config, Overrides())
        if settings is None:
            return EXIT_CONFIG
        if settings.admin.listen is None:
            print(f"cachegate purge: {args.config} has no admin listener (admin.listen); use --admin URL",
                  file=sys.stderr)
            return EXIT_CONFIG
        base = admin_url_of(settings.admin.listen)
        token = token or settings.admin.token
    else:
        base = "http://127.0.0.1:8081"
    try:
        answer = call_admin(base, "POST", "/purge", spec, token, timeout=args.timeout)
    except AdminClientError as exc:
        print(f"cachegate purge: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(answer)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """GET /healthz on the admin API (a container HEALTHCHECK, an exec probe): exit 0 when it
    answers 200, else 1 with why."""
    from proxy.admin_client import AdminClientError, admin_url_of, call_admin

    if args.admin:
        base = args.admin
    else:
        settings = _load(args.config, Overrides())
        if settings is None:
            return EXIT_CONFIG
        if settings.admin.listen is None:
            print(f"cachegate health: {args.config} has no admin listener (admin.listen)", file=sys.stderr)
            return EXIT_CONFIG
        base = admin_url_of(settings.admin.listen)
    try:
        call_admin(base, "GET", "/healthz", None, None, timeout=args.timeout)
    except AdminClientError as exc:
        print(f"cachegate health: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    overrides = _overrides(args)
    settings = _load(args.config, overrides)
    if settings is None:
        return EXIT_CONFIG
    from proxy.logs import setup_logging
    from proxy.runtime import error_log_json

    setup_logging(as_json=error_log_json(settings))
    if settings.workers > 1:
        from proxy.supervisor import supervise

        return supervise(settings, args.config, overrides, use_uvloop=not args.no_uvloop)
    from proxy.web.server import serve

    return run_async(serve(settings, args.config, overrides), not args.no_uvloop)


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from proxy.demo import prepare_demo, run_demo

    try:
        config, settings = prepare_demo(args.listen, args.admin_listen, args.origin_listen, args.rules,
                                        args.cache_dir)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_CONFIG
    return run_async(run_demo(settings, config, args.origin_listen), not args.no_uvloop)


def cmd_sample_origin(args: argparse.Namespace) -> int:
    from proxy.demo import run_origin

    return run_async(run_origin(args.listen), True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachegate", description="HTTP caching reverse proxy")
    parser.add_argument("--version", action="version", version=f"cachegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the proxy")
    _add_config_args(p)
    _add_run_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config and its rule files")
    _add_config_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("explain", help="show the rule, cache key and TTL decision for a URL",
                       description="Why was this (not) cached? Shows which rule matches URL, the cache "
                                   "key, and what happens to a response of each --status.")
    _add_config_args(p)
    p.add_argument("url", metavar="URL", help="absolute URL as a client would request it")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="request header, repeatable (Cookie, Accept-Language, Cache-Control, ...)")
    p.add_argument("-X", "--method", default="GET", help="request method (default GET)")
    p.add_argument("--status", action="append", type=int, default=[], metavar="N",
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
    where.add_argument("--admin", metavar="URL", help="admin API address, e.g. http://127.0.0.1:8081")
    where.add_argument("--config", "-c", metavar="FILE", help="take the admin address from this config")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("health", help="exit 0 when the admin API's /healthz answers (for health checks)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", metavar="FILE", help="take the admin address from this config")
    where.add_argument("--admin", metavar="URL", help="admin API address, e.g. http://127.0.0.1:8081")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("demo", help="run a sample origin with cachegate in front of it")
    p.add_argument("--origin-listen", default="127.0.0.1:9000", metavar="HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    p.add_argument("--admin-listen", default="127.0.0.1:8081", metavar="HOST:PORT")
    p.add_argument("--rules", default="rules/default.yaml", metavar="FILE")
    p.add_argument("--cache-dir", default="var/cache", metavar="DIR")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-uvloop", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sample-origin", help="only the demo's sample origin (for deploy/compose.yaml)")
    p.add_argument("--listen", default="127.0.0.1:9000", metavar="HOST:PORT")
    p.set_defaults(func=cmd_sample_origin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
