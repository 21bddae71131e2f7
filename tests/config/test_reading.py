"""Reading the config file: every key's value, default and mistakes, as ``FILE:LINE: message``.

Each case is one line appended to a config that names one upstream, so its problems are on
line 2; the expected problems are the whole list, in order (every problem is reported, not
only the first).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Listener, Overrides, Settings, load_config
from proxy.errors import ConfigError

U = "upstreams: [http://127.0.0.1:9]\n"
TLS_FORM = "expected HOST:PORT or {address: HOST:PORT, tls: {cert: FILE, key: FILE}}"
BAD_SIZE = "use bytes or KB, MB, GB"
BAD_DURATION = "use seconds or 30s, 5m, 1h, 1d"
TWICE = "; list it once (a weight: gives it a bigger share)"
REDIS_URL = ("is not a Redis URL: use redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or "
             "unix:///path/to/redis.sock")


def _get(settings: Settings, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


# A CA certificate (self-signed, EC P-256, valid until 2126): ``upstream.tls.ca_file`` must hold one.
CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBjjCCATWgAwIBAgIUJtFWOJrn6aRho5ChrN3a/jC9QhgwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRY2FjaGVnYXRlIHRlc3QgQ0EwIBcNMjYxMjA1MjIxMzAwWhgP
MjEyNjExMTEyMjEzMDBaMBwxGjAYBgNVBAMMEWNhY2hlZ2F0ZSB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf9Y6JAawqdDbIhdm2JEz4Clip+ITc127
yf97i03EV9zq8iU9HTVsoMUVowvK94mfX8lCim4x7qQm9yjz9JvTXaNTMFEwHQYD
VR0OBBYEFNsF/+WFOvMekblvvyFuMtADVA/iMB8GA1UdIwQYMBaAFNsF/+WFOvMe
kblvvyFuMtADVA/iMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIg
IcXPtufbIgwbLK1W0mjVxdcLTkGOl3xwqhjnQG4If5MCIA/kaqA9dplcEAtBgvIY
YRJoUmbhbvxpVFl1AXn4NNPC
-----END CERTIFICATE-----
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "ca.pem").write_text(CA_PEM)
    (tmp_path / "r.yaml").write_text("rules: []\n")
    (tmp_path / "logs").mkdir()
    return tmp_path


def load(folder: Path, text: str, overrides: Overrides | None = None) -> Settings:
    path = folder / "c.yaml"
    path.write_text(text)
    return load_config(str(path), overrides)


def problems(folder: Path, text: str, overrides: Overrides | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(folder, text, overrides)
    prefix = f"{folder / 'c.yaml'}:"
    return [p.removeprefix(prefix) for p in info.value.problems]


GIB, MIB = 1 << 30, 1 << 20

VALUES: list[tuple[str, dict[str, Any]]] = [
    ("", {"listen": ("127.0.0.1", 8080), "pool.balance": "round_robin", "pool.timeouts.connect": 5.0,
          "pool.timeouts.read": 60.0, "pool.timeouts.total": None, "pool.pool_size": 256,
          "pool.preserve_host": True, "pool.retries": 1, "pool.retry_non_idempotent": False,
          "pool.health": None, "pool.passive.failures": 3, "pool.passive.cooldown": 10.0,
          "pool.passive.configured": False, "pool.tls.verify": True, "pool.tls.ca_file": None,
          "cache.memory": 256 * MIB, "cache.memory_max_object": MIB, "cache.memory_policy": "lru",
          "cache.max_object": 100 * MIB, "cache.lock_timeout": 5.0, "cache.hit_for_pass": 5.0,
          "cache.disk.path": "{dir}/var/cache", "cache.disk.size": 10 * GIB, "cache.disk.shards": 8,
          "cache.disk.eviction": "least-recently-stored", "cache.tag_headers": ("Surrogate-Key", "Cache-Tag"),
          "cache.range_fill": "whole", "admin.listen": ("127.0.0.1", 8081), "admin.token": None,
          "admin.purge_from": (), "admin.hosts": (), "admin.server_names": (), "rule_files": (),
          "trusted_proxies": (), "workers": 1, "shutdown_grace": 10.0, "via": "cachegate", "cluster": None,
          "max_request_head": 32 * 1024, "client_body_timeout": 60.0, "client_body_buffer": 64 * 1024,
          "client_body_min_rate": 500, "max_unsent": 64 * MIB, "access_log": None, "server_header": "cachegate",
          "rules.base.max_object": 100 * MIB}),
    ("listen: ':80'", {"listeners": (Listener("0.0.0.0", 80),)}),
    ("listen: '[::1]:80'", {"listeners": (Listener("::1", 80),)}),
    ("listen: null", {"listeners": (Listener("127.0.0.1", 8080),)}),
    ("listen: [':0', ':0']", {"listeners": (Listener("0.0.0.0", 0), Listener("0.0.0.0", 0))}),
    ("listen: [':1', {address: ':2'}]", {"listeners": (Listener("0.0.0.0", 1), Listener("0.0.0.0", 2))}),
    ("upstream: {balance: least_conn, pool_size: 3, retries: 0, retry_non_idempotent: true}",
     {"pool.balance": "least_conn", "pool.pool_size": 3, "pool.retries": 0, "pool.retry_non_idempotent": True}),
    ("upstream: {timeouts: {connect: 1s, read: 2m, total: 1h}, preserve_host: no}",
     {"pool.timeouts.connect": 1.0, "pool.timeouts.read": 120.0, "pool.timeouts.total": 3600.0,
      "pool.preserve_host": False}),
    ("upstream: {timeouts: null, passive: null, health: null}",
     {"pool.timeouts.read": 60.0, "pool.passive.configured": False, "pool.health": None}),
    ("upstream: {health: {}}", {"pool.health.path": "/healthz", "pool.health.interval": 5.0,
                                "pool.health.timeout": 1.0, "pool.health.healthy": 2, "pool.health.unhealthy": 3}),
    ("upstream: {health: {path: /h, interval: 2s, timeout: 3, healthy: 1, unhealthy: 5}}",
     {"pool.health.path": "/h", "pool.health.interval": 2.0, "pool.health.timeout": 3.0,
      "pool.health.healthy": 1, "pool.health.unhealthy": 5}),
    ("upstream: {passive: {}}", {"pool.passive.configured": True, "pool.passive.failures": 3}),
    ("upstream: {passive: {failures: 0, cooldown: 0}}",
     {"pool.passive.configured": True, "pool.passive.failures": 0, "pool.passive.cooldown": 0.0}),
    ("upstream: {passive: {failures: 0, cooldown: 1m}}",
     {"pool.passive.configured": True, "pool.passive.failures": 0, "pool.passive.cooldown": 60.0}),
    ("upstream: {tls: {verify: false, ca_file: ca.pem}}", {"pool.tls.verify": False,
                                                          "pool.tls.ca_file": "{dir}/ca.pem"}),
    ("cache: {memory: 1GB, memory_policy: lfu, lock_timeout: 1m, hit_for_pass: 2h, range_fill: none}",
     {"cache.memory": GIB, "cache.memory_policy": "lfu", "cache.lock_timeout": 60.0,
      "cache.hit_for_pass": 7200.0, "cache.range_fill": "none"}),
    ("cache: {memory: 256MB, memory_max_object: 2MB, max_object: 1GB}",
     {"cache.max_object": GIB, "rules.base.max_object": 576 * MIB}),  # half a disk shard
    ("cache: {max_object: 1}", {"rules.base.max_object": 1}),
    ("cache: {disk: null}", {"cache.disk": None, "rules.base.max_object": MIB}),
    ("cache: {disk: {}}", {"cache.disk.path": "{dir}/var/cache", "cache.disk.shards": 8}),
    ("cache: {disk: {path: /abs, size: 1GB, shards: 2, eviction: least-recently-used}}",
     {"cache.disk.path": "/abs", "cache.disk.size": GIB, "cache.disk.shards": 2,
      "cache.disk.eviction": "least-recently-used"}),
    ("cache: {disk: {path: rel/dir}}", {"cache.disk.path": "{dir}/rel/dir"}),
    ("cache: {tag_headers: X-Tag}", {"cache.tag_headers": ("X-Tag",)}),
    ("cache: {tag_headers: [a, 5]}", {"cache.tag_headers": ("a", "5")}),
    ("cache: {tag_headers: null}", {"cache.tag_headers": ()}),
    ("cache: null", {"cache.memory": 256 * MIB, "cache.disk.path": "{dir}/var/cache"}),
    ("admin: {listen: null}", {"admin.listen": None}),
    ("admin: {listen: false}", {"admin.listen": None}),
    ("admin: {listen: '[::1]:9', token: ''}", {"admin.listen": ("::1", 9), "admin.token": None}),
    ("admin: {listen: '0.0.0.0:1', token: 0123456789abcdef}",
     {"admin.listen": ("0.0.0.0", 1), "admin.token": "0123456789abcdef"}),
    ("admin: {purge_from: 10.0.0.0/8}", {"admin.purge_from": (ipaddress.ip_network("10.0.0.0/8"),)}),
    ("admin: {purge_from: ['10.0.0.1', '::1/128']}",
     {"admin.purge_from": (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("::1/128"))}),
    ("admin: {hosts: Example.COM., server_names: ['*.a.com', 'a:80', '[::1]:80']}",
     {"admin.hosts": ("example.com",), "admin.server_names": ("*.a.com", "a:80", "[::1]:80")}),
    # admin.hosts names what a purge may name (no guard against pages): a wide wildcard is the
    # operator's choice there; server_names keeps *.localhost (loopback) and *.co.uk (two labels).
    ("admin: {hosts: ['*.com'], server_names: ['*.localhost', '*.co.uk']}",
     {"admin.hosts": ("*.com",), "admin.server_names": ("*.localhost", "*.co.uk")}),
    ("admin: null", {"admin.listen": ("127.0.0.1", 8081)}),
    ("trusted_proxies: [10.0.0.0/8]", {"trusted_proxies": (ipaddress.ip_network("10.0.0.0/8"),)}),
    ("trusted_proxies: null", {"trusted_proxies": ()}),
    ("rules: [r.yaml]", {"rule_files": ("{dir}/r.yaml",)}),
    ("rules: null", {"rule_files": ()}),
    ("rules: r.yaml", {"rule_files": ("{dir}/r.yaml",)}),  # one file, as tag_headers takes one field
    ("workers: 2", {"workers": 2}),
    ("workers: '3'", {"workers": 3}),
    ("workers: null", {"workers": 1}),  # null is the default, as for every other key
    ("shutdown_grace: 1h30m", {"shutdown_grace": 5400.0}),
    ("shutdown_grace: 5", {"shutdown_grace": 5.0}),
    ("client_body_timeout: 10s", {"client_body_timeout": 10.0}),
    ("via: 5", {"via": "5"}),
    ("access_log: true", {"access_log.format": "json", "access_log.path": "stdout"}),
    ("access_log: false", {"access_log": None}),
    ("access_log: {}", {"access_log.format": "json", "access_log.path": "stdout"}),
    ("access_log: {format: combined, path: logs/a.log}",
     {"access_log.format": "combined", "access_log.path": "{dir}/logs/a.log"}),
    ("cluster: {redis: 'redis://h:1'}",
     {"cluster.redis": "redis://h:1", "cluster.node": f"{socket.gethostname()}:8080",
      "cluster.namespace": "cachegate", "cluster.ack_timeout": 2.0, "cluster.shared_cache": False,
      "cluster.shared_max_object": 256 * 1024, "cluster.required": True, "cluster.stream_max": 100_000,
      "cluster.heartbeat": 1.0, "cluster.timeout": 1.0}),
    ("cluster: {redis: 'unix:///tmp/r.sock', node: ''}", {"cluster.node": f"{socket.gethostname()}:8080"}),
    ("cluster: {redis: 'rediss://h:1', node: n1, namespace: ns, shared_max_object: 1MB, required: false, "
     "shared_cache: true, timeout: 2s}",
     {"cluster.node": "n1", "cluster.namespace": "ns", "cluster.shared_max_object": MIB,
      "cluster.required": False, "cluster.shared_cache": True, "cluster.timeout": 2.0}),
    ("cluster: null", {"cluster": None}),
    ("max_request_head: 64KB", {"max_request_head": 64 * 1024}),
    ("max_request_head: 1024", {"max_request_head": 1024}),
    ("max_unsent: 8MB", {"max_unsent": 8 * MIB}),
    ("max_unsent: 1048576", {"max_unsent": MIB}),
    ("max_unsent: null", {"max_unsent": None}),  # no budget
    ("server_header: '  x  '", {"server_header": "x"}),
    ("server_header: 5", {"server_header": "5"}),
    ("via: edge-1.example:8080", {"via": "edge-1.example:8080"}),
]


@pytest.mark.parametrize(("line", "expected"), VALUES, ids=[c[0] or "defaults" for c in VALUES])
def test_each_key_reads_its_value_and_leaves_the_others_at_their_defaults(
        folder: Path, line: str, expected: dict[str, Any]) -> None:
    settings = load(folder, U + line + "\n")
    for path, value in expected.items():
        if isinstance(value, str):
            value = value.replace("{dir}", str(folder))
        elif isinstance(value, tuple):
            value = tuple(v.replace("{dir}", str(folder)) if isinstance(v, str) else v for v in value)
        assert _get(settings, path) == value, path


PROBLEMS: list[tuple[str, list[str]]] = [
    ("lisen: x", ["2: unknown key 'lisen' (did you mean 'listen'?)"]),
    ("foo: 1\nbar: 2", ["2: unknown key 'foo'", "3: unknown key 'bar'"]),
    ("listen: 8080x", ["2: listen: expected HOST:PORT, got '8080x'"]),
    ("listen: []", ["2: listen: give at least one HOST:PORT"]),
    ("listen: ['a:1', 'a:1']", ["2: listen[1]: a:1 is listed twice"]),
    ("listen: ['127.0.0.1:1', 'localhost:1']",
     ["2: listen[1]: localhost:1 is listed twice: it and 127.0.0.1:1 both take 127.0.0.1:1"]),
    ("listen: ['0.0.0.0:1', '[::1]:1', '10.0.0.1:1']",
     ["2: listen[2]: 10.0.0.1:1 is listed twice: it and 0.0.0.0:1 both take 10.0.0.1:1"]),
    ("listen: true", [f"2: listen: {TLS_FORM}"]),
    ("listen: [[1]]", [f"2: listen[0]: {TLS_FORM}"]),
    ("listen: {address: ':1', foo: 1}", ["2: unknown key 'listen.foo' (allowed: address, tls)"]),
    ("listen: {address: x}", ["2: listen.address: expected HOST:PORT, got 'x'"]),
    ("listen: [{address: 5}]", ["2: listen[0].address: expected HOST:PORT, got '5'"]),
    ("listen: {address: ':1', tls: 3}", ["2: listen.tls: expected {cert: FILE, key: FILE}, got an integer"]),
    ("listen: {address: ':1', tls: null}",
     ["2: listen.tls: expected {cert: FILE, key: FILE}, got nothing (null)"]),
    ("listen:\n  - ':1'\n  - address: ':2'\n    tls:\n      cert: a", ["5: listen[1].tls.key: required (a PEM file)",
                                                                   "6: listen[1].tls.cert: {dir}/a does not exist"]),
    ("listen: {tls: {cert: a, key: b}}",
     ["2: listen.address: required (HOST:PORT)",
      "2: listen.tls.cert: {dir}/a does not exist", "2: listen.tls.key: {dir}/b does not exist"]),
    ("listen: {address: ':1', tls: {cert: a, key: b, x: 1}}",
     ["2: unknown key 'listen.tls.x' (allowed: cert, key)",
      "2: listen.tls.cert: {dir}/a does not exist", "2: listen.tls.key: {dir}/b does not exist"]),
    ("upstream: {balance: x}", ["2: upstream.balance: must be one of round_robin, least_conn, got 'x'"]),
    ("upstream: {timeouts: {total: x}}", [f"2: upstream.timeouts.total: bad duration 'x': {BAD_DURATION}"]),
    ("upstream: {timeouts: 5}", ["2: upstream.timeouts: expected a mapping, got an integer"]),
    ("upstream: {timeouts: {connect: -1}}", ["2: upstream.timeouts.connect: duration must not be negative, got -1"]),
    ("upstream: {pool_size: 0}", ["2: upstream.pool_size: must be at least 1, got 0"]),
    ("upstream: {pool_size: 1.5}", ["2: upstream.pool_size: expected an integer, got a number"]),
    ("upstream: {pool_size: true}", ["2: upstream.pool_size: expected an integer, got true/false"]),
    ("upstream: {retries: -1}", ["2: upstream.retries: must be at least 0, got -1"]),
    ("upstream: {preserve_host: 'yes'}", ["2: upstream.preserve_host: expected true or false, got a string"]),
    ("upstream: {health: {path: x}}", ["2: upstream.health.path: must start with '/', got 'x'"]),
    ("upstream: {health: {healthy: 0, unhealthy: 0}}", ["2: upstream.health.healthy: must be at least 1, got 0",
                                                        "2: upstream.health.unhealthy: must be at least 1, got 0"]),
    ("upstream: {passive: 3}", ["2: upstream.passive: expected a mapping, got an integer"]),
    ("upstream: {tls: {ca_file: missing.pem}}", ["2: upstream.tls.ca_file: {dir}/missing.pem does not exist"]),
    ("upstream: {tls: {ca_file: r.yaml}}", ["2: upstream.tls.ca_file: no CA certificate in {dir}/r.yaml (a PEM "
                                            "file of one or more '-----BEGIN CERTIFICATE-----' blocks is expected)"]),
    ("upstream: {tls: {ca_file: logs}}", ["2: upstream.tls.ca_file: no CA certificate in {dir}/logs: it is a "
                                          "directory (a PEM file of CA certificates is expected)"]),
    ("upstream: {tls: {ca_file: 5}}", ["2: upstream.tls.ca_file: expected a string, got an integer"]),
    ("upstream: 5", ["2: upstream: expected a mapping, got an integer"]),
    ("upstream: {baalnce: x}", ["2: unknown key 'upstream.baalnce' (did you mean 'balance'?)"]),
    ("upstream: {timeouts: {conect: 1}}", ["2: unknown key 'upstream.timeouts.conect' (did you mean 'connect'?)"]),
    ("cache: {memory: x}", [f"2: cache.memory: bad size 'x': {BAD_SIZE}"]),
    ("cache: {memory: -1}", ["2: cache.memory: size must not be negative, got -1"]),
    ("cache: {memory: true}", ["2: cache.memory: expected a size like 256MB, got true"]),
    ("cache: {memory_policy: x}", ["2: cache.memory_policy: must be one of lru, lfu, got 'x'"]),
    ("cache: {hit_for_pass: x}", [f"2: cache.hit_for_pass: bad duration 'x': {BAD_DURATION}"]),
    ("cache: {disk: {eviction: x}}",
     ["2: cache.disk.eviction: must be one of least-recently-stored, least-recently-used, got 'x'"]),
    ("cache: {disk: {shards: 0}}", ["2: cache.disk.shards: must be at least 1, got 0"]),
    ("cache: {disk: 5}", ["2: cache.disk: expected a mapping, got an integer"]),
    ("cache: {disk: {sise: 1}}", ["2: unknown key 'cache.disk.sise' (did you mean 'size'?)"]),
    ("cache: {tag_headers: [a, [b]]}", ["2: cache.tag_headers: expected strings in the list, got a list"]),
    ("cache: {range_fill: slice}", ["2: cache.range_fill: must be one of whole, none, got 'slice'"]),
    ("cache: 5", ["2: cache: expected a mapping, got an integer"]),
    ("admin: {token: 5}", ["2: admin.token: expected a string, got an integer"]),
    ("admin: {hosts: ['*.a.com', 'bad host', 5]}",
     ["2: admin.hosts: 'bad host' is not a host name, host:port or *.domain",
      "2: admin.hosts: 5 is not a host name, host:port or *.domain"]),
    # A port no Host field can carry never matches: refused, not kept as dead weight.
    ("admin: {hosts: ['a:99999', 'b:0', 'c:65535'], server_names: ['c:70000', '[::1]:0', 'd:1']}",
     ["2: admin.hosts: 'a:99999' has port 99999, which no Host field can carry (a port is 1 to 65535)",
      "2: admin.hosts: 'b:0' has port 0, which no Host field can carry (a port is 1 to 65535)",
      "2: admin.server_names: 'c:70000' has port 70000, which no Host field can carry (a port is 1 to "
      "65535)",
      "2: admin.server_names: '[::1]:0' has port 0, which no Host field can carry (a port is 1 to 65535)"]),
    ("admin: {server_names: 5}", ["2: admin.server_names: expected a list, got an integer"]),
    # A Host whose brackets hold no IPv6 address is answered 400: such an entry could never match
    # (an admin name silently refused).
    ("admin: {hosts: ['[1:2:3]', '[::1]', '[0:0::1]:8080'], server_names: ['[2001:db8:1]', '[v1.x]', '[::1%25lo]']}",
     ["2: admin.hosts: '[1:2:3]': the brackets hold no IPv6 address: no Host field can name it (one that does "
      "is answered 400)",
      "2: admin.server_names: '[2001:db8:1]': the brackets hold no IPv6 address: no Host field can name it (one "
      "that does is answered 400)",
      "2: admin.server_names: '[v1.x]': the brackets hold no IPv6 address: no Host field can name it (one that "
      "does is answered 400)",
      "2: admin.server_names: '[::1%25lo]': a zone (%...) names one of the sender's own interfaces: no Host "
      "field carries one"]),
    # A DNS rebinding guard that lets every page under a public suffix through guards nothing.
    ("admin: {server_names: ['*.com', '*.ops.example', '*.UK.:8081', '*.localhost', '*.co.uk']}",
     ["2: admin.server_names: '*.com' matches every name under .com: any web page there could pass the "
      "DNS rebinding guard; list your own domain (*.ops.example) or the names themselves",
      "2: admin.server_names: '*.UK.:8081' matches every name under .uk: any web page there could pass "
      "the DNS rebinding guard; list your own domain (*.ops.example) or the names themselves"]),
    ("admin: {listen: '[::]:0'}",  # bracketed, as it was written: ':::0' read as nothing
     ["2: admin.listen [::]:0 is not loopback and admin.token is not set: the admin API would be open to "
      "anyone who can reach it; set admin.token or listen on 127.0.0.1"]),
    ("admin: {purge_from: 5}", ["2: admin.purge_from: expected a list, got an integer"]),
    ("admin: {purge_from: [x, 10.0.0.1]}", ["2: admin.purge_from: 'x' is not an IP address or CIDR network"]),
    # Host bits set: the whole network was trusted without a word (nginx warns).
    ("admin: {purge_from: [10.0.0.1/8]}",
     ["2: admin.purge_from: 10.0.0.1/8 has host bits set: write 10.0.0.1/32 for the host or 10.0.0.0/8 "
      "for the network"]),
    ("trusted_proxies: [192.168.1.7/16, 'fd00::1/64', 10.0.0.0/8]",
     ["2: trusted_proxies: 192.168.1.7/16 has host bits set: write 192.168.1.7/32 for the host or "
      "192.168.0.0/16 for the network",
      "2: trusted_proxies: fd00::1/64 has host bits set: write fd00::1/128 for the host or fd00::/64 "
      "for the network"]),
    ("admin: {listen: x}", ["2: admin.listen: expected HOST:PORT, got 'x'"]),
    ("admin: {lsten: 1}", ["2: unknown key 'admin.lsten' (did you mean 'listen'?)"]),
    ("admin: 5", ["2: admin: expected a mapping, got an integer"]),
    ("admin: {listen: '0.0.0.0:1'}",
     ["2: admin.listen 0.0.0.0:1 is not loopback and admin.token is not set: the admin API would be open to "
      "anyone who can reach it; set admin.token or listen on 127.0.0.1"]),
    ("admin:\n  listen: 0.0.0.0:1\n  token: abc",
     ["4: admin.token is 3 characters long; on a listener others can reach (admin.listen 0.0.0.0:1) it must "
      "have at least 16 (e.g. the output of `openssl rand -hex 24`)"]),
    ("trusted_proxies: [x, 10.0.0.1]", ["2: trusted_proxies: 'x' is not an IP address or CIDR network"]),
    ("trusted_proxies: 5", ["2: trusted_proxies: expected a list, got an integer"]),
    ("rules: [missing.yaml]", ["2: rules: rule file {dir}/missing.yaml does not exist"]),
    ("rules: [r.yaml, 5]", ["2: rules: rule file {dir}/5 does not exist"]),
    ("rules: [logs]", ["2: rules: rule file {dir}/logs is a directory"]),
    ("rules: [/dev/zero]", ["2: rules: rule file /dev/zero is not a regular file (a device)"]),
    ("rules: [r.yaml, r.yaml, ./r.yaml]", ["2: rules: rule file r.yaml is listed twice; list it once",
                                           "2: rules: rule file ./r.yaml is listed twice (as r.yaml before); "
                                           "list it once"]),
    ("workers: 0", ["2: workers: expected a positive number or auto, got '0'"]),
    ("workers: lots", ["2: workers: expected a positive number or auto, got 'lots'"]),
    ("workers: true", ["2: workers: expected a positive number or auto, got 'True'"]),
    ("shutdown_grace: x", [f"2: shutdown_grace: bad duration 'x': {BAD_DURATION}"]),
    ("client_body_timeout: 0", ["2: client_body_timeout: must be at least 1s (a client's next part of a body "
                                "takes its round trip and more: a tiny limit answers uploads 408), got 0s"]),
    ("via: [a]", ["2: via: expected a string, got a list"]),
    ("access_log: {format: x}", ["2: access_log.format: must be one of json, combined, got 'x'"]),
    ("access_log: {path: nowhere/a.log}", ["2: access_log.path: directory {dir}/nowhere does not exist"]),
    ("access_log: {fmt: json}", ["2: unknown key 'access_log.fmt' (did you mean 'format'?)"]),
    ("access_log: 'yes'",
     ["2: access_log: expected true, false or {format: json|combined, path: stdout|FILE}, got a string"]),
    ("rules: 5", ["2: rules: expected a list, got an integer"]),
    ("cluster: {node: a}", ["2: cluster.redis: required (e.g. redis://127.0.0.1:6379/0)"]),
    ("cluster: {redis: 5}", ["2: cluster.redis: expected a string, got an integer"]),
    ("cluster: {redis: 'http://h:1'}", [f"2: cluster.redis: 'http://h:1' {REDIS_URL}"]),
    ("cluster: {redis: 'redis://:pw@h:1/0', ack_timeout: soon}",
     [f"2: cluster.ack_timeout: bad duration 'soon': {BAD_DURATION}"]),
    ("cluster: {redis: 'redis://h:1', node: 'a b'}",
     ["2: cluster.node: 'a b': use letters, digits and . _ - : @ (at most 200)"]),
    ("cluster: {redis: 'redis://h:1', namespace: 'a b'}",
     ["2: cluster.namespace: 'a b': use letters, digits and . _ - (at most 64)"]),
    ("cluster: {redis: 'redis://h:1', timeout: 0, heartbeat: 0}",
     ["2: cluster.heartbeat: must be more than 0", "2: cluster.timeout: must be more than 0"]),
    ("cluster: {redis: 'redis://h:1', stream_max: 5}", ["2: cluster.stream_max: must be at least 100, got 5"]),
    ("cluster: x", ["2: cluster: expected a mapping, got a string"]),
    ("max_request_head: 512",
     ["2: max_request_head: must be at least 1KB (a browser's request head is 0.5-2KB), got 512 bytes"]),
    ("max_request_head: x", [f"2: max_request_head: bad size 'x': {BAD_SIZE}"]),
    ("max_unsent: 0", ["2: max_unsent: must be at least 1MB (null: no budget), got 0 bytes"]),
    ("max_unsent: 512KB", ["2: max_unsent: must be at least 1MB (null: no budget), got 524288 bytes"]),
    ("max_unsent: -1", ["2: max_unsent: size must not be negative, got -1"]),
    ("max_unsent: lots", [f"2: max_unsent: bad size 'lots': {BAD_SIZE}"]),
    ("max_unsent: false", ["2: max_unsent: expected a size like 256MB, got false"]),
    ("server_header: ''", ["2: server_header: expected printable ASCII text, got ''"]),
    ("server_header: 'caché'", ["2: server_header: expected printable ASCII text, got 'caché'"]),
    ("via: \"x\\r\\nX-Evil: 1\"", ["2: via: expected a name like cachegate or edge-1.example:8080 (letters, "
                                   "digits, - . _ and no spaces), got 'x\\r\\nX-Evil: 1'"]),
    ("via: 'my cache'", ["2: via: expected a name like cachegate or edge-1.example:8080 (letters, digits, - . _ "
                         "and no spaces), got 'my cache'"]),
    ("upstream: {health: {path: \"/h\\r\\nX: 1\"}}",
     ["2: upstream.health.path: a path is printable ASCII without spaces (percent-encode the rest), "
      "got '/h\\r\\nX: 1'"]),
    ("cache:\n  memory: x\n  disk:\n    size: y\n    shards: 0\n  memry: 3",
     [f"3: cache.memory: bad size 'x': {BAD_SIZE}", f"5: cache.disk.size: bad size 'y': {BAD_SIZE}",
      "6: cache.disk.shards: must be at least 1, got 0", "7: unknown key 'cache.memry' (did you mean 'memory'?)"]),
    ("upstream:\n  health:\n    path: nope\n  tls:\n    ca_file: missing",
     ["4: upstream.health.path: must start with '/', got 'nope'",
      "6: upstream.tls.ca_file: {dir}/missing does not exist"]),
]


@pytest.mark.parametrize(("line", "expected"), PROBLEMS, ids=[c[0] for c in PROBLEMS])
def test_each_mistake_is_one_problem_at_its_line(folder: Path, line: str, expected: list[str]) -> None:
    assert problems(folder, U + line + "\n") == [e.replace("{dir}", str(folder)) for e in expected]


@pytest.mark.parametrize(("a", "b", "shared"), [
    ({"127.0.0.1"}, {"127.0.0.1", "::1"}, "127.0.0.1"),  # localhost and 127.0.0.1
    ({"0.0.0.0"}, {"10.0.0.1"}, "10.0.0.1"),  # a wildcard takes every address of its family
    ({"::1"}, {"::"}, "::1"),
    ({"::"}, {"0.0.0.0"}, None),  # one of each family (asyncio binds IPv6 sockets V6ONLY)
    ({"127.0.0.1"}, {"127.0.0.2"}, None),
])
def test_two_listeners_on_one_port_clash_when_they_take_one_address(
        a: set[str], b: set[str], shared: str | None) -> None:
    from proxy.settings import shared_address

    assert shared_address(frozenset(a), frozenset(b)) == shared


# A list or a mapping where one value goes: the problem names what it is ("got a list", as every
# other key says), not the reader's records of its elements (it said ``got [Src(value=1,
# file='c.yaml', line=2, key_lines={}, raw='1', key_texts={}), ...]``). VALUE: the value given.
NOT_SCALARS: list[tuple[str, str]] = [
    ("cache: {lock_timeout: VALUE}", "cache.lock_timeout: expected a duration like 30s, 5m, 1h, got KIND"),
    ("shutdown_grace: VALUE", "shutdown_grace: expected a duration like 30s, 5m, 1h, got KIND"),
    ("upstream: {timeouts: {read: VALUE}}", "upstream.timeouts.read: expected a duration like 30s, 5m, 1h, got KIND"),
    ("cluster: {redis: 'redis://h:1', ack_timeout: VALUE}",
     "cluster.ack_timeout: expected a duration like 30s, 5m, 1h, got KIND"),
    ("cache: {memory: VALUE}", "cache.memory: expected a size like 256MB, got KIND"),
    ("cache: {disk: {size: VALUE}}", "cache.disk.size: expected a size like 256MB, got KIND"),
    ("max_request_head: VALUE", "max_request_head: expected a size like 256MB, got KIND"),
    ("workers: VALUE", "workers: expected a positive number or auto, got KIND"),
    ("upstream: {retries: VALUE}", "upstream.retries: expected an integer, got KIND"),
    ("cache: {disk: {shards: VALUE}}", "cache.disk.shards: expected an integer, got KIND"),
    ("upstream: {preserve_host: VALUE}", "upstream.preserve_host: expected true or false, got KIND"),
    ("admin: {listen: VALUE}", "admin.listen: expected HOST:PORT, got KIND"),
    ("admin: {token: VALUE}", "admin.token: expected a string, got KIND"),
    ("access_log: {format: VALUE}", "access_log.format: expected a string, got KIND"),
    ("admin: {hosts: [VALUE]}", "admin.hosts: KIND is not a host name, host:port or *.domain"),
    ("admin: {server_names: [VALUE]}", "admin.server_names: KIND is not a host name, host:port or *.domain"),
    ("trusted_proxies: [VALUE]", "trusted_proxies: expected IP addresses or CIDR networks in the list, got KIND"),
    ("admin: {purge_from: [VALUE]}", "admin.purge_from: expected IP addresses or CIDR networks in the list, got KIND"),
    ("cache: {tag_headers: [VALUE]}", "cache.tag_headers: expected strings in the list, got KIND"),
]
KINDS = [("[1, 2]", "a list"), ("{a: 1}", "a mapping")]


@pytest.mark.parametrize(("value", "kind"), KINDS, ids=[k for _, k in KINDS])
@pytest.mark.parametrize(("line", "expected"), NOT_SCALARS, ids=[c[0] for c in NOT_SCALARS])
def test_a_list_or_a_mapping_for_one_value_is_named_by_its_kind(
        folder: Path, line: str, expected: str, value: str, kind: str) -> None:
    assert problems(folder, U + line.replace("VALUE", value) + "\n") == ["2: " + expected.replace("KIND", kind)]


# The same in a rule file (line 4: the rule's last line); "|" joins the problem's line and words.
# Each names its rule (rules[0].ttl...), as stale_while_revalidate did and ttl and ttl_jitter did not.
RULE_NOT_SCALARS: list[tuple[str, str]] = [
    ("ttl: {200: VALUE}", "rules[0].ttl.200: expected a duration like 30s, 5m, 1h, got KIND"),
    ("ttl: {404: VALUE}", "rules[0].ttl.404: expected a duration like 30s, 5m, 1h, got KIND"),
    ("ttl: {default: VALUE}", "rules[0].ttl.default: expected a duration like 30s, 5m, 1h, got KIND"),
    ("stale_while_revalidate: VALUE",
     "rules[0].stale_while_revalidate: expected a duration like 30s, 5m, 1h, got KIND"),
    ("ttl_jitter: VALUE", "rules[0].ttl_jitter: expected a percentage below 100% like 10%, got KIND"),
]


@pytest.mark.parametrize(("value", "kind"), KINDS, ids=[k for _, k in KINDS])
@pytest.mark.parametrize(("line", "expected"), RULE_NOT_SCALARS, ids=[c[0] for c in RULE_NOT_SCALARS])
def test_a_list_or_a_mapping_for_one_value_of_a_rule_is_named_by_its_kind(
        folder: Path, line: str, expected: str, value: str, kind: str) -> None:
    rules = folder / "r.yaml"
    rules.write_text("rules:\n  - name: a\n    match: {path: /x}\n    " + line.replace("VALUE", value) + "\n")
    with pytest.raises(ConfigError) as info:
        load(folder, U + "rules: [r.yaml]\n")
    assert info.value.problems == [f"{rules}:4: " + expected.replace("KIND", kind)]
    assert not [w for w in info.value.warnings if "Src(" in w]  # (a ttl's warning showed them too)


@pytest.mark.parametrize(("rules", "expected"), [
    ("rules:\n  - name: a\n    match: {path: /x}\n    ttl: [1, 2]\n",
     "4: rules[0].ttl: expected a duration or a mapping of status to duration (e.g. {200: 5m, 404: 1m, default: 1m}), "
     "got a list"),
    ("defaults: {ttl: [1, 2]}\nrules: []\n",
     "1: defaults.ttl: expected a duration or a mapping of status to duration (e.g. {200: 5m, 404: 1m, default: 1m}), "
     "got a list"),
    ("rules:\n  - name: a\n    match: {path: /x, status: [[1, 2], {a: 1}]}\n    ttl: 1m\n",
     "3: rules[0].match.status: expected HTTP status codes (100-599), got a list|"
     "3: rules[0].match.status: expected HTTP status codes (100-599), got a mapping"),
])
def test_a_list_for_a_ttl_or_a_status_is_named_by_its_kind(folder: Path, rules: str, expected: str) -> None:
    (folder / "r.yaml").write_text(rules)
    with pytest.raises(ConfigError) as info:
        load(folder, U + "rules: [r.yaml]\n")
    assert info.value.problems == [f"{folder / 'r.yaml'}:{e}" for e in expected.split("|")]
    assert not [w for w in info.value.warnings if "Src(" in w]


UPSTREAMS: list[tuple[str, list[str]]] = [
    ("[{url: 'http://a:1', weight: 0}]", ["1: upstreams[].weight: must be at least 1, got 0"]),
    ("[{url: 'http://a:1', weight: x}]", ["1: upstreams[].weight: expected an integer, got a string"]),
    ("[{weight: 2}]", ["1: upstreams[].url: required"]),
    ("[{url: 5}]", ["1: upstreams[].url: expected a string, got an integer"]),
    ("[5]", ["1: upstreams: each entry is a URL or {url: ..., weight: ...}"]),
    ("[null]", ["1: upstreams: each entry is a URL or {url: ..., weight: ...}"]),
    ("[ftp://a]", ["1: upstream url 'ftp://a': expected http://HOST[:PORT] or https://..."]),
    ("[http://a/path]", ["1: upstream url 'http://a/path': must not have a path or query"]),
    ("[\"http://a\\r\\nX: 1\"]",
     ["1: upstream url 'http://a\\r\\nX: 1': must not contain spaces or control characters"]),
    ("['http://a b:1']", ["1: upstream url 'http://a b:1': must not contain spaces or control characters"]),
    ("['http://a?q']", ["1: upstream url 'http://a?q': must not have a path or query"]),
    ("['http://[::1]@']", ["1: upstream url 'http://***@': credentials in the URL are not sent to the "
                           "origin (and would be shown in logs and metrics); remove them"]),
    ("['http://u:pw@a:1']", ["1: upstream url 'http://***@a:1': credentials in the URL are not sent to the "
                             "origin (and would be shown in logs and metrics); remove them"]),
    # the password is never shown, whatever else is wrong with the URL
    ("['http://u:S3cret@a:1/app']", ["1: upstream url 'http://***@a:1': credentials in the URL are not sent to the "
                             "origin (and would be shown in logs and metrics); remove them"]),
    ("['http://u:S3cret@a:99999']", ["1: upstream url 'http://***@a:99999': credentials in the URL are not sent to the "
                             "origin (and would be shown in logs and metrics); remove them"]),
    ("['ftp://u:S3cret@a']", ["1: upstream url 'ftp://***@a': credentials in the URL are not sent to the "
                             "origin (and would be shown in logs and metrics); remove them"]),
    ("['u:S3cret@a:1']", ["1: upstream url '***@a:1': credentials in the URL are not sent to the "
                             "origin (and would be shown in logs and metrics); remove them"]),
    ("['http://:pw@[::1]:1#x@y']", ["1: upstream url 'http://***@[::1]:1': credentials in the URL are not sent to "
                                    "the origin (and would be shown in logs and metrics); remove them"]),
    ("[{url: 'http://a', foo: 1}]", ["1: unknown key 'upstreams[].foo' (allowed: url, weight)"]),
    ("http://a", ["1: upstreams: expected a list, got a string",
                  "1: no upstreams: add upstreams: [{url: http://HOST:PORT}] or --upstream URL"]),
    ("[]", ["1: no upstreams: add upstreams: [{url: http://HOST:PORT}] or --upstream URL"]),
    # one upstream listed twice was two in /upstreams (each its own health and share), merged in /metrics
    ("['http://a:1', 'http://a:1']", [f"1: upstreams: upstream 'http://a:1' is listed twice{TWICE}"]),
    ("\n  - 'http://[::1]:8'\n  - 'http://[0:0::1]:8'\n  - 'http://[::1]:08'",
     [f"3: upstreams: upstream 'http://[0:0::1]:8' is listed twice: it and 'http://[::1]:8' are one upstream{TWICE}",
      f"4: upstreams: upstream 'http://[::1]:08' is listed twice: it and 'http://[::1]:8' are one upstream{TWICE}"]),
    ("['http://LOCALHOST', 'http://localhost.:80']",
     [f"1: upstreams: upstream 'http://localhost.:80' is listed twice: it and 'http://LOCALHOST' are one "
      f"upstream{TWICE}"]),
    ("['http://127.0.0.1:8', 'http://127.0.0.01:8', 'http://2130706433:8', 'http://0x7f.1:8']",
     [f"1: upstreams: upstream '{u}' is listed twice: it and 'http://127.0.0.1:8' are one upstream{TWICE}"
      for u in ("http://127.0.0.01:8", "http://2130706433:8", "http://0x7f.1:8")]),
    ("['http://a:1', {url: 'http://A:01', weight: 2}]",
     [f"1: upstreams: upstream 'http://A:01' is listed twice: it and 'http://a:1' are one upstream{TWICE}"]),
]


@pytest.mark.parametrize(("value", "expected"), UPSTREAMS, ids=[c[0] for c in UPSTREAMS])
def test_upstream_mistakes(folder: Path, value: str, expected: list[str]) -> None:
    assert problems(folder, f"upstreams: {value}\n") == expected


def test_upstream_entries_take_a_url_or_a_mapping_and_lose_a_trailing_slash(folder: Path) -> None:
    s = load(folder, "upstreams: ['https://a:443/', {url: 'http://b:1', weight: 3}]\n")
    assert [(str(u.url), u.weight) for u in s.upstreams] == [("https://a", 1), ("http://b:1", 3)]


def test_upstreams_that_differ_are_kept_apart(folder: Path) -> None:
    """Another scheme, port or name is another upstream; a name is not resolved (``localhost``
    and ``127.0.0.1`` may be two virtual hosts of one server, told apart by Host)."""
    urls = ["http://a:1", "https://a:1", "http://a:2", "http://b:1", "http://localhost:1", "http://127.0.0.1:1",
            "http://[::1]:1", "http://[::ffff:127.0.0.1]:1", "http://127.0.0.2:1"]
    s = load(folder, f"upstreams: {urls}\n")
    assert len(s.upstreams) == len(urls)


def test_an_upstream_given_twice_on_the_command_line_is_refused(folder: Path) -> None:
    assert problems(folder, U, Overrides(upstreams=("http://a.example:1", "http://A.example.:01"))) == [
        "<command line>:0: --upstream: upstream 'http://A.example.:01' is listed twice: it and "
        f"'http://a.example:1' are one upstream{TWICE}"]


def test_a_rule_file_that_is_a_fifo_is_named_as_one_not_read(folder: Path) -> None:
    os.mkfifo(folder / "pipe.yaml")  # reading it would wait for a writer forever
    assert problems(folder, U + "rules: [pipe.yaml]\n") == [
        f"2: rules: rule file {folder}/pipe.yaml is not a regular file (a FIFO)"]


def test_a_file_that_is_not_a_mapping_is_one_problem(folder: Path) -> None:
    assert problems(folder, "[]\n") == [
        "1: the config file must be a mapping (listen:, upstreams:, cache:, ...)",
        "1: no upstreams: add upstreams: [{url: http://HOST:PORT}] or --upstream URL"]


def test_command_line_overrides_replace_what_the_file_says(folder: Path) -> None:
    s = load(folder, U + "listen: [':1', ':2']\ncluster: {redis: 'redis://h:1'}\n", Overrides(
        upstreams=("http://x:1",), admin_listen="off", workers="3", cache_path="/tmp/else"))
    assert [li.address for li in s.listeners] == [("0.0.0.0", 1), ("0.0.0.0", 2)]
    assert [str(u.url) for u in s.upstreams] == ["http://x:1"]
    assert (s.admin.listen, s.workers, s.cache.disk and s.cache.disk.path) == (None, 3, "/tmp/else")
    assert s.cluster is not None and s.cluster.node == f"{socket.gethostname()}:1"  # the file's port
    assert problems(folder, U, Overrides(listen=("bad",), admin_listen="bad", workers="x")) == [
        "<command line>:0: --listen: expected HOST:PORT, got 'bad'",
        "<command line>:0: --admin-listen: expected HOST:PORT, got 'bad'",
        "<command line>:0: --workers: expected a positive number or auto, got 'x'"]


def test_without_a_file_the_defaults_apply_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_config(None, Overrides(upstreams=("http://a:1",)))
    assert s.source == "<defaults>"
    assert s.cache.disk is not None and s.cache.disk.path == os.path.join(str(tmp_path), "var/cache")


# (listen, the address the first listener was bound at, the default Host of an HTTP/1.0 request)
BOUND = [
    ("127.0.0.1:0", ("127.0.0.1", 41234), "127.0.0.1:41234"),  # port 0: the port the system chose
    ("localhost:0", ("127.0.0.1", 41234), "localhost:41234"),  # (the host as the config writes it)
    ("'[::1]:0'", ("::1", 41234), "[::1]:41234"),
    ("127.0.0.1:8080", ("127.0.0.1", 8080), "127.0.0.1:8080"),
    ("127.0.0.1:0", None, "127.0.0.1:0"),  # not bound yet
]


@pytest.mark.parametrize(("listen", "bound", "host"), BOUND)
def test_the_default_host_names_the_port_the_listener_was_bound_at(
        folder: Path, listen: str, bound: tuple[str, int] | None, host: str) -> None:
    settings = load(folder, U + f"listen: {listen}\n")
    assert settings.bound_listener(bound).default_host == host
    assert settings.bound_listener(bound).max_head == settings.client_listener.max_head
