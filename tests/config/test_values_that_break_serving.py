"""Values that passed ``cachegate check`` (or crashed it) and then broke the start or serving:
each is now one ``FILE:LINE: key: message`` problem, at start, in ``check`` and on a reload
(which keeps the running config)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import proxy.settings
from proxy.config import Overrides, load_config
from proxy.errors import ConfigError
from proxy.leases import MAX_WORKERS
from proxy.settings import parse_workers
from proxy.units import parse_duration, parse_size
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

U = "upstreams: [http://127.0.0.1:9]\n"
HUGE = "1" + "0" * 400  # a YAML integer float() cannot take (OverflowError)


def problems(folder: Path, text: str, rules: str | None = None) -> list[str]:
    """The problems of a config (``rules``: the rule file r.yaml), without the folder."""
    if rules is not None:
        (folder / "r.yaml").write_text(rules)
    path = folder / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return [p.replace(f"{folder}/", "") for p in info.value.problems]


# -- timers below what serving needs -------------------------------------------------------

WORKER_FLOOR = ("must be at least 1s (a worker busy for a moment answers the supervisor's ping late; less "
                "has the watchdog kill sound workers in a loop, and nothing is served)")


@pytest.mark.parametrize(("line", "expected"), [
    ("worker_timeout: 5ms", f"c.yaml:2: worker_timeout: {WORKER_FLOOR}, got 0.005s"),
    ("worker_timeout: 1ms", f"c.yaml:2: worker_timeout: {WORKER_FLOOR}, got 0.001s"),
    ("worker_timeout: 0.999", f"c.yaml:2: worker_timeout: {WORKER_FLOOR}, got 0.999s"),
    ("worker_timeout: 0", f"c.yaml:2: worker_timeout: {WORKER_FLOOR}, got 0s"),
    ("client_header_timeout: 5ms", "c.yaml:2: client_header_timeout: must be at least 1s (a client's round "
     "trip, and its TLS handshake, take longer than a tiny limit: connections are closed before their "
     "requests), got 0.005s"),
    ("client_body_timeout: 500ms", "c.yaml:2: client_body_timeout: must be at least 1s (a client's next part "
     "of a body takes its round trip and more: a tiny limit answers uploads 408), got 0.5s"),
    ("keepalive_timeout: 500ms", "c.yaml:2: keepalive_timeout: must be 0 (no keep-alive) or at least 1s (a "
     "client's next request often comes later than that: one sent as the connection closes fails), got 0.5s"),
])
def test_a_timer_below_its_floor_is_refused_at_its_line(tmp_path: Path, line: str, expected: str) -> None:
    assert problems(tmp_path, U + line + "\n") == [expected]


def test_the_floors_themselves_load(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(U + "worker_timeout: 1s\nclient_header_timeout: 1s\n"
                                         "client_body_timeout: 1000ms\nkeepalive_timeout: 1s\n")
    s = load_config(str(tmp_path / "c.yaml"))
    assert (s.worker_timeout, s.client_header_timeout, s.client_body_timeout, s.keepalive_timeout) == (1.0,) * 4
    (tmp_path / "c.yaml").write_text(U + "keepalive_timeout: 0\n")  # no keep-alive
    assert load_config(str(tmp_path / "c.yaml")).keepalive_timeout == 0


def _read(path: str) -> str:
    return Path(path).read_text()


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


async def test_a_reload_to_a_tiny_worker_timeout_is_refused_and_the_workers_keep_serving(
        origin: Origin, tmp_path: Path) -> None:
    """worker_timeout: 5ms was reloaded (200, no warning), then the watchdog killed every worker
    in a loop: thousands of failed requests. A huge duration and a path holding a NUL answered
    400 "FILE:0: reload failed: OverflowError(...)" / ValueError. Each is now refused at its
    line; the running config stays, and no worker is killed."""
    origin.route("/x", body=b"x", headers={"Cache-Control": "no-store"})
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    config = write_config(str(tmp_path), origin.url, cache)
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        workers = dict(proxy.workers)
        assert (await proxy.get("/x")).status == 200
        good = _read(config)
        at = len(good.splitlines()) + 1  # the line added
        for extra, line in [("worker_timeout: 5ms\n", "worker_timeout: must be at least 1s"),
                            (f"upstream: {{timeouts: {{connect: {HUGE}}}}}\n",
                             "upstream.timeouts.connect: duration 1000"),
                            ('access_log: {path: "a\\x00b"}\n', "access_log.path: a path cannot contain a NUL")]:
            _write(config, good + extra)
            reply = await proxy.admin("POST", "/reload")
            assert reply.status == 400, reply.body
            problem = json.loads(reply.body)["problems"][0]
            assert problem.startswith(f"{config}:{at}: {line}"), problem
        await asyncio.sleep(1.0)  # a 5 ms watchdog would have killed both workers many times by now
        for _ in range(10):
            assert (await proxy.get("/x")).status == 200
        assert proxy.workers == workers
        assert not any("killing it" in line for line in proxy.lines)
    finally:
        await proxy.stop(signal.SIGTERM)


def test_run_refuses_a_tiny_worker_timeout_at_its_line(tmp_path: Path) -> None:
    """Started with worker_timeout: 1ms, it never served (every worker killed at its first ping)."""
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nupstreams: [http://127.0.0.1:9]\nadmin: {listen: '127.0.0.1:0'}\n"
                      "cache: {memory: 8MB, disk: null}\nworker_timeout: 1ms\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config), "--workers", "2"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"{config}:5: worker_timeout: {WORKER_FLOOR}, "
                                                               "got 0.001s"])


# -- tracebacks: huge integers, NUL characters ---------------------------------------------

TOO_LONG = "duration 10000000000000000000... (401 characters) is too long: at most 2147483648s (about 68 years)"


@pytest.mark.parametrize(("text", "rules", "expected"), [
    (f"shutdown_grace: {HUGE}\n", None, f"c.yaml:2: shutdown_grace: {TOO_LONG}"),
    (f"upstream: {{timeouts: {{connect: {HUGE}}}}}\n", None, f"c.yaml:2: upstream.timeouts.connect: {TOO_LONG}"),
    ("rules: [r.yaml]\n", f"defaults:\n  ttl: {{200: {HUGE}}}\nrules: []\n", f"r.yaml:2: defaults.ttl.200: {TOO_LONG}"),
    ("rules: [r.yaml]\n", f"rules:\n  - name: a\n    match: {{path: /**}}\n    ttl: {HUGE}\n",
     "r.yaml:4: rules[0].ttl: expected a duration or a mapping of status to duration (e.g. {200: 5m, 404: 1m, "
     f"default: 1m}}), got 10000000000000000000... (401 characters) ({TOO_LONG})"),
])
def test_a_duration_of_hundreds_of_digits_is_too_long_not_an_overflow(
        tmp_path: Path, text: str, rules: str | None, expected: str) -> None:
    assert problems(tmp_path, U + text, rules) == [expected]


@pytest.mark.parametrize("value", [10 ** 400, "1" + "0" * 400, "1" + "0" * 400 + "ms"])
def test_parse_duration_of_a_huge_number_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="is too long: at most 2147483648s"):
        parse_duration(value)


NUL = "a path cannot contain a NUL character (\\x00), got"


@pytest.mark.parametrize(("text", "expected"), [
    ('rules: ["r\\x00.yaml"]', f"c.yaml:2: rules: {NUL} 'r\\x00.yaml'"),
    ('cache: {disk: {path: "/tmp/a\\x00b"}}', f"c.yaml:2: cache.disk.path: {NUL} '/tmp/a\\x00b'"),
    ('access_log: {path: "/tmp/a\\x00b"}', f"c.yaml:2: access_log.path: {NUL} '/tmp/a\\x00b'"),
    ('upstream: {tls: {ca_file: "/tmp/a\\x00b"}}', f"c.yaml:2: upstream.tls.ca_file: {NUL} '/tmp/a\\x00b'"),
    ('listen: {address: "127.0.0.1:0", tls: {cert: "c\\x00.pem", key: "k\\x00.pem"}}',
     f"c.yaml:2: listen.tls.cert: {NUL} 'c\\x00.pem'"),
])
def test_a_path_holding_a_nul_is_refused_at_its_line(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, U + text + "\n")
    assert found[0] == expected
    assert all("NUL" in p for p in found)  # (listen.tls.key the same)


@pytest.mark.parametrize("text", [f"shutdown_grace: {HUGE}", 'cache: {disk: {path: "/tmp/a\\x00b"}}'])
def test_check_and_run_print_the_line_not_a_traceback(tmp_path: Path, text: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n" + U + text + "\n")
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"{config}:4: ")


# -- digits of other scripts ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["１６MB", "٣KB", "1.٥MB", "१०"])
def test_a_size_in_other_digits_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"bad size .*\(in the digits 0-9\)"):
        parse_size(value)


@pytest.mark.parametrize("value", ["٣s", "１６", "1h ٣m", "2.５s"])
def test_a_duration_in_other_digits_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"bad duration .*\(in the digits 0-9\)"):
        parse_duration(value)


def test_other_digits_in_the_config_are_named_at_their_line(tmp_path: Path) -> None:
    assert problems(tmp_path, U + 'cache: {memory: "１６MB", lock_timeout: "٣s"}\n') == [
        "c.yaml:2: cache.memory: bad size '１６MB': use bytes or KB, MB, GB (in the digits 0-9)",
        "c.yaml:2: cache.lock_timeout: bad duration '٣s': use seconds or 30s, 5m, 1h, 1d (in the digits 0-9)"]


# -- what check passed and the start refused -----------------------------------------------


@pytest.mark.parametrize("written", ["localhost", "127.0.0.1"])
def test_admin_listen_on_the_client_listeners_address_by_name_is_refused(tmp_path: Path, written: str) -> None:
    """localhost:P beside listen 127.0.0.1:P passed check; the start said "another process
    already accepts connections on this port": cachegate's own client listener."""
    assert problems(tmp_path, U + f"listen: 127.0.0.1:18480\nadmin: {{listen: '{written}:18480'}}\n") == [
        f"c.yaml:3: admin.listen {written}:18480 is the address of a client listener (listen "
        "127.0.0.1:18480): give the admin API a port of its own"]


def test_admin_listen_on_another_port_or_address_loads(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(U + "listen: 127.0.0.2:18480\nadmin: {listen: 'localhost:18480'}\n")
    assert load_config(str(tmp_path / "c.yaml")).admin.listen == ("localhost", 18480)


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_cache_path_under_a_file_is_refused_at_its_line(tmp_path: Path, command: str) -> None:
    """The start said "cannot open the cache directory ...: Not a directory" after check passed."""
    (tmp_path / "afile").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n" + U
                      + "cache: {memory: 8MB, max_object: 1MB, disk: {path: afile/sub/deeper, size: 32MB}}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"{config}:4: cache.disk.path: {tmp_path}/afile/sub/deeper cannot be made: {tmp_path}/afile is a file; "
        "give a directory elsewhere"])


def test_a_cache_path_not_made_yet_under_a_directory_loads(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(U + "cache: {disk: {path: not/yet/made}}\n")
    disk = load_config(str(tmp_path / "c.yaml")).cache.disk
    assert disk is not None and disk.path == f"{tmp_path}/not/yet/made"


# -- workers beyond what the lease table counts --------------------------------------------


def test_max_workers_is_the_lease_tables() -> None:
    assert proxy.settings.MAX_WORKERS == MAX_WORKERS


def test_more_workers_than_the_lease_table_counts_are_refused_at_their_line(tmp_path: Path) -> None:
    """Worker 64 and up fetched every miss for itself (the lease table's waiters are a 64-bit mask)."""
    assert problems(tmp_path, U + "workers: 65\n") == [
        "c.yaml:2: workers: at most 64, got 65: 64 workers at most wait for each other's fetch of a key (one "
        "origin request per machine); more would each fetch every miss for itself"]
    (tmp_path / "ok.yaml").write_text(U + "workers: 64\n")
    assert load_config(str(tmp_path / "ok.yaml")).workers == 64
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "ok.yaml"), Overrides(workers="65"))
    (problem,) = info.value.problems
    assert problem.startswith("<command line>:0: --workers: at most 64, got 65: ")


def test_workers_auto_is_at_most_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.settings, "available_cpus", lambda: 192)
    assert parse_workers("auto") == 64
    monkeypatch.setattr(proxy.settings, "available_cpus", lambda: 12)
    assert parse_workers("auto") == 12


# -- a key's empty query list --------------------------------------------------------------


def test_an_empty_include_list_of_a_key_says_what_to_write(tmp_path: Path) -> None:
    """It said "an empty list never matches; remove the condition instead": it is no condition,
    and for a key an empty include list means "drop every parameter"."""
    rules = ("rules:\n  - name: q\n    match: {path: /q/**}\n    key: {query: {include: []}}\n"
             "  - name: r\n    match: {path: /r/**}\n    key: {query: {exclude: []}}\n"
             "  - name: s\n    match: {path: /s/**, method: []}\n    no_store: true\n")
    assert problems(tmp_path, U + "rules: [r.yaml]\n", rules) == [
        "r.yaml:4: rules[0].key.query.include: an empty list keeps no parameter: to drop the whole query from "
        "the key, write query: ignore; else list the parameters to keep",
        "r.yaml:7: rules[1].key.query.exclude: an empty list drops no parameter; list the parameters to drop, "
        "or remove exclude:",
        "r.yaml:9: rules[2].match.method: an empty list never matches; remove the condition instead"]


def test_a_redis_url_holding_a_nul_is_refused_at_its_line(tmp_path: Path) -> None:
    """A unix socket's path holding a NUL passed check (the client's connect raises ValueError)."""
    assert problems(tmp_path, U + 'cluster: {redis: "unix:///tmp/r\\x00.sock"}\n') == [
        "c.yaml:2: cluster.redis: 'unix:///tmp/r\\x00.sock': a Redis URL must not contain control characters "
        "(percent-encode them)"]
