#!/usr/bin/env python3
"""Micro-benchmark: the cost of rule matching per request, against a no-rules baseline.

Measures ``RuleSet.plan(request)`` (what the proxy runs before every lookup, hits
included) for 50 realistic rules compiled from YAML, over a mix of requests that
match early, late and not at all, with browser-like headers and cookies. Each
scenario is timed in several runs; the table shows the median microseconds per
request and the cost above the no-rules baseline measured in the same run.

    .venv/bin/python scripts/bench_rules.py [--runs 7] [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from multidict import CIMultiDict, CIMultiDictProxy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from proxy.policy.keys import cache_key
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.rules import RuleSet, load_rules
from proxy.yamlsrc import Problems

SECTIONS = ["blog", "docs", "shop", "news", "help", "careers", "press", "events", "forum", "wiki"]


def realistic_rules() -> str:
    """50 rules of the kinds operators write: bypasses, static trees, APIs, per-section TTLs."""
    rules = [
        '- {name: logged-in users, match: {cookie: {session: present}}, bypass: true}',
        '- {name: admin, match: {path: "regex:^/(admin|wp-admin|account|cart|checkout)(/|$)"}, bypass: true}',
        '- {name: previews, match: {query: {preview: present}}, bypass: true}',
        '- {name: api auth, match: {path: "/api/auth/**"}, bypass: true}',
        '- {name: api per user, match: {path: "/api/**", header: {Authorization: present}}, bypass: true}',
        '- {name: api errors, match: {path: "/api/**", status: [500, 502, 503, 504]}, no_store: true}',
        '- name: fingerprinted\n'
        '  match: {path: \'regex:^/assets/.+\\.[0-9a-f]{8,}\\.(css|js|woff2)$\'}\n'
        '  ttl: {200: 365d}\n  override_origin: true\n  key: {query: ignore}',
        '- {name: static, match: {path: "/static/**", method: [GET]}, ttl: {200: 7d}, override_origin: true}',
        '- {name: images, match: {path: "/images/**"}, ttl: {200: 7d, 404: 10m}, key: {query: ignore}}',
        '- {name: fonts, match: {path: "/fonts/*.woff2"}, ttl: {200: 30d}, override_origin: true}',
        '- {name: favicon, match: {path: "/favicon.ico"}, ttl: {200: 1d}}',
        '- {name: robots, match: {path: "/robots.txt"}, ttl: {200: 1h}}',
        '- {name: sitemap, match: {path: "regex:^/sitemap.*\\\\.xml$"}, ttl: {200: 1h}}',
        '- {name: cdn host, match: {host: "*.cdn.example.com"}, ttl: {200: 30d}, override_origin: true}',
        '- name: products\n  match: {path: "/api/v1/products/**", method: GET}\n'
        '  ttl: {200: 5m, 404: 30s}\n'
        '  key: {query: {exclude: [utm_source, utm_medium, utm_campaign], sort: true}, '
        'headers: [Accept-Language]}\n  tags: [catalogue]',
        '- {name: search, match: {path: "/api/v1/search", query: {q: present}}, ttl: {200: 1m}, '
        'key: {query: {include: [q, page], sort: true}}}',
        '- {name: search empty, match: {path: "/api/v1/search"}, bypass: true}',
        '- {name: api v2, match: {path: "/api/v2/**", header: {Accept: {regex: json}}}, ttl: {200: 30s}}',
        '- {name: api rest, match: {path: "/api/**"}, ttl: {200: 10s}}',
    ]
    for i, section in enumerate(SECTIONS):
        rules.append(f'- {{name: "{section} errors", match: {{path: "/{section}/**", status: [500, 503]}}, '
                     f'no_store: true}}')
        rules.append(f'- {{name: "{section} feed", match: {{path: "/{section}/feed.xml"}}, '
                     f'ttl: {{200: {i + 1}m}}}}')
        rules.append(f'- {{name: "{section} pages", match: {{path: "/{section}/**", method: GET}}, '
                     f'ttl: {{200: {i + 2}m, 404: 1m}}, tags: [{section}]}}')
    rules.append('- {name: mobile, match: {header: {User-Agent: {regex: "Mobile|Android"}}, '
                 'path: "/m/**"}, key: {headers: [User-Agent]}}')
    assert len(rules) == 50, len(rules)
    return "rules:\n" + "\n".join("  " + r.replace("\n", "\n  ") for r in rules) + "\n"


def worst_case_rules() -> str:
    """50 rules no path index can skip (header and cookie conditions only), none matching."""
    return "rules:\n" + "".join(
        f'  - {{name: r{i}, match: {{header: {{X-Tenant: {{regex: "^t{i}$"}}}}, '
        f'cookie: {{c{i}: present}}}}, bypass: true}}\n' if i % 2 else
        f'  - {{name: r{i}, match: {{cookie: {{c{i}: present}}}}, bypass: true}}\n'
        for i in range(50))


def compile_yaml(text: str) -> RuleSet:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    problems = Problems()
    try:
        rules = load_rules([(f.name, "bench.yaml")], CacheOptions(), problems)
    finally:
        os.unlink(f.name)
    if problems:
        raise SystemExit("\n".join(problems.items))
    return rules


BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-GB,en;q=0.9,de;q=0.8",
    "Accept-Encoding": "gzip, deflate, br",
    "Cookie": "_ga=GA1.2.1234; ab_bucket=b; consent=yes",
    "Sec-Fetch-Mode": "navigate",
    "Upgrade-Insecure-Requests": "1",
}


def requests() -> list[RequestHead]:
    targets = [
        "/", "/blog/2024/05/caching-is-hard", "/docs/install?utm_source=x", "/shop/shoes/red",
        "/static/app.css", "/images/Logo.PNG?v=3", "/assets/app.3f9a1c2e8b.js",
        "/api/v1/products/42?utm_source=a&b=2", "/api/v1/search?q=shoes&page=2", "/api/v2/items",
        "/wiki/Main_Page", "/events/2024", "/unknown/path/x", "/favicon.ico", "/m/home",
        "/account/settings", "/news/feed.xml", "/careers/jobs?preview=1",
    ]
    out = []
    for i, t in enumerate(targets):
        headers = CIMultiDict(BROWSER)
        headers["Host"] = "www.example.com"
        if i % 5 == 0:
            headers["Cookie"] = BROWSER["Cookie"] + "; session=abc"
        out.append(RequestHead("GET", "https", "www.example.com", t, CIMultiDictProxy(headers)))
    return out


def per_request_us(fn, reqs: list[RequestHead], n: int) -> float:  # type: ignore[no-untyped-def]
    batch = (reqs * (n // len(reqs) + 1))[:n]
    start = time.perf_counter()
    for r in batch:
        fn(r)
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()

    none, realistic, worst = RuleSet(), compile_yaml(realistic_rules()), compile_yaml(worst_case_rules())
    reqs = requests()
    scenarios = [
        ("no rules (baseline)", lambda r: none.plan(r)),
        ("50 realistic rules", lambda r: realistic.plan(r)),
        ("50 unindexed rules, none match", lambda r: worst.plan(r)),
        ("baseline + cache key", lambda r: cache_key(r, none.plan(r).key)),
        ("50 realistic rules + cache key", lambda r: cache_key(r, realistic.plan(r).key)),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in scenarios}
    for _name, fn in scenarios:  # warm up
        per_request_us(fn, reqs, 2000)
    for _ in range(args.runs):
        for name, fn in scenarios:  # interleaved, so drift hits every scenario alike
            results[name].append(per_request_us(fn, reqs, args.requests))

    base = statistics.median(results["no rules (baseline)"])
    base_key = statistics.median(results["baseline + cache key"])
    print(f"rule matching per request: median of {args.runs} runs x {args.requests} requests "
          f"({len(reqs)} distinct URLs), Python {sys.version.split()[0]}")
    print(f"{'scenario':36} {'us/request':>11} {'min':>7} {'max':>7} {'above baseline':>15}")
    for name, _ in scenarios:
        runs = results[name]
        med = statistics.median(runs)
        ref = base_key if "cache key" in name else base
        print(f"{name:36} {med:11.2f} {min(runs):7.2f} {max(runs):7.2f} {med - ref:+15.2f}")
    realistic_med = statistics.median(results["50 realistic rules"])
    verdict = "PASS" if realistic_med < 10 else "FAIL"
    print(f"\n{verdict}: matching 50 realistic rules costs {realistic_med:.2f} us per request "
          f"({realistic_med - base:+.2f} us above no rules; target: under 10 us)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
