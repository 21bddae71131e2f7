"""IPv6 hosts in brackets that hold no IPv6 address a connect can take (an upstream's URL,
``cluster.redis``): each is one ``FILE:LINE`` problem in ``check``, at start and on a reload
(which keeps the running config). They crashed config reading with a Python traceback
(yarl and ``urlsplit`` raise ValueError late), or, for an IPvFuture literal, passed check and
every request was a 502."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.settings import Settings
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

NO_V6 = "the brackets hold no IPv6 address: {} (an IPv6 address, [2001:db8::1], or a name without brackets)"


def _read(path: str) -> str:
    return Path(path).read_text()


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def loaded(folder: Path, text: str) -> Settings:
    path = folder / "c.yaml"
    path.write_text(text)
    return load_config(str(path))


def problems(folder: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loaded(folder, text)
    return [p.replace(f"{folder}/", "") for p in info.value.problems]


@pytest.mark.parametrize(("url", "inside"), [
    ("http://[1:2:3]:9000", "1:2:3"),
    ("http://[1:2:3]", "1:2:3"),
    ("https://[::1:2:3:4:5:6:7:8]:1", "::1:2:3:4:5:6:7:8"),
    ("http://[v1.fe]:9000", "v1.fe"),  # IPvFuture: passed check, then a 502 for ever
])
def test_an_upstream_whose_brackets_hold_no_ipv6_address_is_refused_at_its_line(
        tmp_path: Path, url: str, inside: str) -> None:
    assert problems(tmp_path, f"upstreams: [http://127.0.0.1:9, {url!r}]\n") == [
        f"c.yaml:1: upstream url {url!r}: {NO_V6.format(repr(inside))}"]
    # (and a mapping's url:)
    assert problems(tmp_path, f"upstreams:\n  - {{url: {url!r}, weight: 2}}\n") == [
        f"c.yaml:2: upstream url {url!r}: {NO_V6.format(repr(inside))}"]


@pytest.mark.parametrize(("url", "shown", "inside"), [
    ("redis://[1:2:3]:6379/0", "(a URL that cannot be read: not shown, it may hold a password)", "1:2:3"),
    ("redis://[v1.fe]:6379/0", "redis://[v1.fe]:6379/0", "v1.fe"),
])
def test_a_redis_url_whose_brackets_hold_no_ipv6_address_is_refused_at_its_line(
        tmp_path: Path, url: str, shown: str, inside: str) -> None:
    assert problems(tmp_path, f"upstreams: [http://127.0.0.1:9]\ncluster: {{redis: {url!r}}}\n") == [
        f"c.yaml:2: cluster.redis: {shown!r}: {NO_V6.format(repr(inside))}"]


def test_ipv6_hosts_with_and_without_a_zone_still_load(tmp_path: Path) -> None:
    settings = loaded(tmp_path, "upstreams: ['http://[::1]:9', 'http://[fe80::1%25lo]:9']\n"
                                "cluster: {redis: 'redis://[fe80::1%25lo]:6379/0'}\n")
    assert [str(u.url) for u in settings.upstreams] == [
        "http://[::1]:9", "http://[fe80::1%25lo]:9"]


def test_check_and_run_say_file_line_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\ncache: {memory: 8MB}\n"
                      "upstreams: ['http://[1:2:3]:9000']\n")
    expected = [f"{config}:4: upstream url 'http://[1:2:3]:9000': {NO_V6.format(repr('1:2:3'))}"]
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.splitlines()) == (2, expected), done.stderr
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\ncache: {memory: 8MB}\n"
                      "upstreams: ['http://127.0.0.1:9']\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config),
                           "--upstream", "http://[1:2:3]:9000"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (
        2, [f"<command line>:0: upstream url 'http://[1:2:3]:9000': {NO_V6.format(repr('1:2:3'))}"])


async def test_a_reload_to_such_a_host_is_refused_at_its_line_and_keeps_serving(
        origin: Origin, tmp_path: Path) -> None:
    """A reload answered 400 "FILE:0: reload failed: ValueError(...)"."""
    origin.route("/x", body=b"x", headers={"Cache-Control": "no-store"})
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB}\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(with_log=True)
    try:
        await proxy.wait_for(lambda: bool(proxy.admin_url))
        good = _read(config)
        for url, cluster in [("http://[1:2:3]:9000", ""), ("http://[v1.fe]:9000", ""),
                             (origin.url, "cluster: {redis: 'redis://[1:2:3]:6379/0'}\n")]:
            _write(config, good.replace(origin.url, url) + cluster)
            reply = await proxy.admin("POST", "/reload")
            assert reply.status == 400, reply.body
            problem = json.loads(reply.body)["problems"][0]
            assert ":0:" not in problem and "the brackets hold no IPv6 address" in problem, problem
            assert problem.startswith(f"{config}:"), problem
        assert (await proxy.get("/x")).status == 200
        assert origin.count("/x") == 1
    finally:
        await proxy.stop(signal.SIGTERM)


# -- listen: what check passed and run could not bind ------------------------------------------

BRACKETS = "an IPv6 address is written in brackets, the port after them: [::1]:8080"


@pytest.mark.parametrize(("listen", "problem"), [
    ("::1", BRACKETS),  # was host ':' port 1
    ("::1:0", BRACKETS),  # was [::1]:0, silently
    ("[1:2:3]:0", "the brackets hold no IPv6 address"),
    ("[]:0", "the brackets hold no IPv6 address"),
    ("[::1%lo]:0", "a zone (%...) applies to a link-local address (fe80::/10) only: remove it"),
    ("[::ffff:127.0.0.1]:0", "an IPv4-mapped address is bound in its IPv4 form: 127.0.0.1:PORT"),
    ("[fe80::1]:0", "a link-local address is bound on one interface: name it, [fe80::1%eth0]:PORT (or its "
                    "number)"),
    ("[fe80::1%25lo]:0", "no network interface '25lo' here (the zone is the interface's name as 'ip link' "
                         "shows it, not percent-encoded, or its number)"),
])
def test_a_listen_address_run_cannot_bind_is_refused_at_its_line(tmp_path: Path, listen: str, problem: str) -> None:
    assert problems(tmp_path, f"upstreams: [http://127.0.0.1:9]\nlisten: {listen!r}\n") == [
        f"c.yaml:2: listen: {listen!r}: {problem}"]
    assert problems(tmp_path, f"upstreams: [http://127.0.0.1:9]\nadmin: {{listen: {listen!r}}}\n") == [
        f"c.yaml:2: admin.listen: {listen!r}: {problem}"]


def test_listen_addresses_that_bind_still_load(tmp_path: Path) -> None:
    settings = loaded(tmp_path, "upstreams: [http://127.0.0.1:9]\n"
                      "listen: ['[::1]:0', '[::]:0', ':0', '127.0.0.1:0', '[fe80::1%lo]:0', '[fe80::1%1]:0']\n")
    assert [li.address for li in settings.listeners] == [
        ("::1", 0), ("::", 0), ("0.0.0.0", 0), ("127.0.0.1", 0), ("fe80::1%lo", 0), ("fe80::1%1", 0)]


def test_listen_on_the_command_line_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("admin: {listen: '127.0.0.1:0'}\ncache: {memory: 8MB}\nupstreams: ['http://127.0.0.1:9']\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config), "--listen", "::1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"'::1': {BRACKETS}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_names_the_address_it_cannot_listen_on(tmp_path: Path, workers: str) -> None:
    """"cannot listen: [Errno -2] Name or service not known" named no address."""
    config = tmp_path / "c.yaml"
    config.write_text("listen: nosuch.invalid:0\nadmin: {listen: '127.0.0.1:0'}\ncache: {memory: 8MB}\n"
                      "upstreams: ['http://127.0.0.1:9']\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config), "--workers", workers],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot listen: listen nosuch.invalid:0: " in done.stderr, done.stderr
