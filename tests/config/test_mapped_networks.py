"""IPv4-mapped IPv6 entries in an address list (``trusted_proxies``, ``admin.purge_from``):
``::ffff:127.0.0.1`` is how dual-stack software logs an IPv4 peer, so operators paste it. No
peer of cachegate's has that form (each listener serves one family: an IPv4 client is seen as
its IPv4 address), and such an entry passed ``cachegate check`` and never matched anyone. Now
it is taken as the IPv4 network it maps, with a warning at its line saying what it became."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import load_config
from proxy.errors import ConfigError
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import echo_origin, get, received, request, send_raw

HEAD = "listen: 127.0.0.1:0\nupstreams: [http://127.0.0.1:9]\ncache: {memory: 64MB, disk: null}\n"
MAPPED = ("is written IPv4-mapped (::ffff:...), a form no peer's address takes here (an IPv4 client is "
          "seen as its IPv4 address): taken as")


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.mark.parametrize(("text", "trusted", "said"), [
    ("trusted_proxies: ['::ffff:127.0.0.1']", [net("127.0.0.1/32")],
     [f"trusted_proxies: ::ffff:127.0.0.1 {MAPPED} 127.0.0.1; write 127.0.0.1"]),
    ("trusted_proxies: ['::ffff:127.0.0.0/104']", [net("127.0.0.0/8")],
     [f"trusted_proxies: ::ffff:127.0.0.0/104 {MAPPED} 127.0.0.0/8; write 127.0.0.0/8"]),
    ("trusted_proxies: ['::FFFF:7f00:1']", [net("127.0.0.1/32")],  # hex, upper case
     [f"trusted_proxies: ::FFFF:7f00:1 {MAPPED} 127.0.0.1; write 127.0.0.1"]),
    ("trusted_proxies: ['0:0:0:0:0:ffff:10.1.2.0/120', 10.0.0.0/8]", [net("10.1.2.0/24"), net("10.0.0.0/8")],
     [f"trusted_proxies: 0:0:0:0:0:ffff:10.1.2.0/120 {MAPPED} 10.1.2.0/24; write 10.1.2.0/24"]),
    # The whole mapped range is every IPv4 address: what it became is then too wide, and said so.
    ("trusted_proxies: ['::ffff:0:0/96']", [net("0.0.0.0/0")],
     [f"trusted_proxies: ::ffff:0:0/96 {MAPPED} 0.0.0.0/0; write 0.0.0.0/0",
      "trusted_proxies: 0.0.0.0/0 is wider than a /8: every client may set X-Forwarded-For"]),
    # Not mapped: as they were (a network wider than the mapped range is an IPv6 network).
    ("trusted_proxies: ['::1', '::/80', 'fc00::/7', '64:ff9b::/96']",
     [net("::1/128"), net("::/80"), net("fc00::/7"), net("64:ff9b::/96")], []),
])
def test_a_mapped_trusted_proxy_is_taken_as_its_ipv4_network_and_said_so(
        tmp_path: Path, text: str, trusted: list[object], said: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + text + "\n")
    settings = load_config(str(path))
    assert list(settings.trusted_proxies) == trusted
    warned = [w.removeprefix(f"{path}:4: warning: ") for w in settings.warnings]
    assert len(warned) == len(said) and all(w.startswith(s) for w, s in zip(warned, said, strict=True)), warned


def test_a_mapped_purge_from_is_taken_as_its_ipv4_network_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + "admin:\n  purge_from:\n    - 10.0.0.1\n    - '::ffff:192.168.0.0/112'\n")
    settings = load_config(str(path))
    assert settings.admin.purge_from == (net("10.0.0.1/32"), net("192.168.0.0/16"))
    assert settings.warnings == (f"{path}:7: warning: admin.purge_from: ::ffff:192.168.0.0/112 {MAPPED} "
                                 "192.168.0.0/16; write 192.168.0.0/16",)


@pytest.mark.parametrize(("entry", "said"), [
    # With host bits set, the forms offered are those that can match.
    ("::ffff:127.0.0.1/104", "::ffff:127.0.0.1/104 has host bits set: write 127.0.0.1/32 for the host or "
                             "127.0.0.0/8 for the network"),
    # A prefix shorter than the mapped range's is an IPv6 network: as before.
    ("::ffff:127.0.0.1/64", "::ffff:127.0.0.1/64 has host bits set: write ::ffff:127.0.0.1/128 for the "
                            "host or ::/64 for the network"),
])
def test_a_mapped_network_with_host_bits_is_refused_offering_the_ipv4_forms(
        tmp_path: Path, entry: str, said: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(HEAD + f"trusted_proxies: ['{entry}']\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [f"{path}:4: trusted_proxies: {said}"]


def test_check_prints_what_a_mapped_entry_became_and_strict_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "trusted_proxies: ['::ffff:127.0.0.0/104']\n")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert f"{config}:4: warning: trusted_proxies: ::ffff:127.0.0.0/104 {MAPPED} 127.0.0.0/8" in out.err
    assert "1 warning(s)" in out.out
    assert main(["check", "--strict", "--config", str(config)]) == 2


async def test_a_mapped_entry_trusts_and_lets_purge_the_ipv4_peer_it_names(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The reviewer's case, end to end: the client at 127.0.0.1, both lists written mapped."""
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="trusted_proxies: ['::ffff:127.0.0.0/104']\n"
                                    "admin: {listen: '127.0.0.1:0', purge_from: ['::ffff:127.0.0.1']}\n")
    reply = await send_raw(proxy, get("/page", "X-Forwarded-For: 203.0.113.9"))
    assert received(reply)["fields"]["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    purged = await send_raw(proxy, request("PURGE", "/page", "Host: shop.example"))
    assert purged.status == 200, purged.body
