"""``cachegate check`` looks the upstreams' names up: one that does not resolve here is a
warning at its line (nginx refuses such a config: "host not found in upstream"). It said OK,
and the mistyped name was seen only once traffic came. Not a problem: DNS may be out of reach
where check runs (a CI builder); ``--strict`` refuses it (``--no-lookup``: none looked up). The lookups are made at once and
bounded: a resolver that never answers must not hold check up (glibc waits 5 s a try)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import NAME_LOOKUP_TIMEOUT, load_config

# .invalid never resolves (RFC 2606 §2); localhost is in /etc/hosts.
CONFIG = """\
listen: 127.0.0.1:0
upstreams:
  - http://cg-nonexistent.invalid:8080
  - {url: 'http://localhost:9', weight: 2}
  - http://127.0.0.1:9
  - url: https://cg-other.invalid
cache: {memory: 64MB, disk: null}
"""
UNRESOLVED = [(3, "http://cg-nonexistent.invalid:8080", "cg-nonexistent.invalid"),
              (6, "https://cg-other.invalid", "cg-other.invalid")]


def said(config: Path, err: str) -> list[tuple[int, str]]:
    """The warnings on stderr: (line, message)."""
    out = []
    for line in err.splitlines():
        where, sep, message = line.partition(": warning: ")
        if sep:
            out.append((int(where.removeprefix(f"{config}:")), message))
    return out


def test_check_warns_at_its_line_of_an_upstream_name_that_does_not_resolve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr()
    warned = said(config, out.err)
    assert [line for line, _ in warned] == [line for line, _, _ in UNRESOLVED], out.err
    for (_, message), (_, url, host) in zip(warned, UNRESOLVED, strict=True):
        # Where the resolver here does not answer in time, check says that instead (and still ends).
        assert message.startswith((f"upstream {url!r}: its name {host} does not resolve here (",
                                   f"upstream {url!r}: looking up its name {host} had no answer")), message
    assert "(4 upstream(s), 0 rule(s) from 0 file(s), 2 warning(s))" in out.out
    assert main(["check", "--strict", "--config", str(config)]) == 2
    assert "2 warning(s), refused by --strict" in capsys.readouterr().err
    # Where the deployment's DNS is not (a CI builder), its names are left alone.
    assert main(["check", "--strict", "--no-lookup", "--config", str(config)]) == 0


def test_names_that_resolve_and_addresses_say_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://localhost:9, 'http://[::1]:9', http://127.0.0.1:9]\n"
                      "cache: {memory: 64MB, disk: null}\n")
    assert main(["check", "--strict", "--config", str(config)]) == 0
    assert ": warning: " not in capsys.readouterr().err


def test_only_check_looks_names_up(tmp_path: Path) -> None:
    """The start, a reload and each worker load the config without lookups: the pool resolves
    names as it connects, and a slow resolver must not slow a start."""
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert load_config(str(config)).warnings == ()


@contextlib.contextmanager
def silent_resolver() -> Iterator[str]:
    """A DNS server that never answers, on port 53 of a loopback address of its own; yields
    the address (skips when it cannot be had: not root)."""
    for _ in range(20):
        address = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.53"
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 53))
        except PermissionError:
            sock.close()
            pytest.skip("port 53 cannot be bound here (not root): no resolver of the test's own")
        except OSError:
            sock.close()
            continue
        try:
            yield address
        finally:
            sock.close()
        return
    pytest.skip("no free loopback address for a resolver of the test's own")


def test_a_resolver_that_never_answers_does_not_hold_check_up(tmp_path: Path) -> None:
    """check in a mount namespace of its own whose /etc/resolv.conf names a server that never
    answers: each name had glibc wait 5 s a try, twice; check gives up on them together."""
    if shutil.which("unshare") is None or os.geteuid() != 0 or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs unshare -m (root) to give check a resolv.conf of its own")
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    resolv = tmp_path / "resolv.conf"
    with silent_resolver() as address:
        resolv.write_text(f"nameserver {address}\n")
        script = (f"mount --bind {resolv} /etc/resolv.conf && "
                  f"exec {sys.executable} -m proxy check --config {config}")
        done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    warned = said(config, done.stderr)
    assert warned == [(line, f"upstream {url!r}: looking up its name {host} had no answer within "
                             f"{NAME_LOOKUP_TIMEOUT:g}s (the resolver here is slow or out of reach): whether "
                             "it resolves is not known; check the resolver (/etc/resolv.conf)")
                      for line, url, host in UNRESOLVED], done.stderr
    assert "2 warning(s)" in done.stdout
