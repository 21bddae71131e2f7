"""Poisoning one host's pages through the request target or the Host field.

The attacker sends a request whose key names the victim's host while the origin is told
another one (absolute-form target, a Host spelt differently, no Host at all), so the
origin's answer for the other host is filed under the victim's URL. Afterwards an innocent
client asks for the victim's URL and must get the victim's page, from the cache or not.
"""

from __future__ import annotations

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import echo_origin, get, port_of, received, request, send_raw


async def test_an_absolute_form_target_cannot_store_one_virtual_host_for_another(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    attack = await send_raw(proxy, get("http://victim.example/page", host="attacker.example"))
    assert received(attack)["host"] == "victim.example"  # RFC 9112 §3.2.2: the target's authority wins
    innocent = await send_raw(proxy, get("/page", host="victim.example"))
    assert innocent.x_cache == "HIT"
    assert received(innocent)["host"] == "victim.example"


async def test_an_absolute_form_target_without_a_host_field_sends_its_authority(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    attack = await send_raw(proxy, request("GET", "http://Victim.Example:80/page", version="1.0"))
    assert received(attack)["host"] == "victim.example"  # not the upstream's own address
    innocent = await send_raw(proxy, get("/page", host="victim.example"))
    assert (innocent.x_cache, received(innocent)["host"]) == ("HIT", "victim.example")


async def test_a_host_spelt_differently_reaches_the_origin_as_the_key_names_it(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Case, a trailing dot, the default port or a zero-padded port: one key, one Host upstream."""
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    for spelling in ("VICTIM.example", "victim.example.", "victim.example:80", "victim.example.:080"):
        attack = await send_raw(proxy, get("/page", host=spelling))
        assert received(attack)["host"] == "victim.example", spelling
        innocent = await send_raw(proxy, get("/page", host="victim.example"))
        assert received(innocent)["host"] == "victim.example", spelling
    assert origin.count("/page") == 1  # every spelling is the same key


async def test_userinfo_in_an_absolute_form_target_is_refused(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    refused = await send_raw(proxy, get("http://victim.example@attacker.example/page"))
    assert refused.status == 400 and b"userinfo" in refused.body
    assert origin.count("/page") == 0


async def test_a_fragment_neither_splits_the_key_nor_reaches_the_origin(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A #fragment per request would otherwise make every request a miss (cache busting) and
    send the origin a target no browser sends."""
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    first = await send_raw(proxy, get("/page?a=1#x"))
    assert received(first)["target"] == "/page?a=1"
    second = await send_raw(proxy, get("/page?a=1#y"))
    third = await send_raw(proxy, get("/page?a=1"))
    assert (second.x_cache, third.x_cache) == ("HIT", "HIT")
    assert origin.count("/page") == 1


async def test_a_1_0_request_without_host_names_the_port_the_listener_was_bound_at(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``listen: 127.0.0.1:0`` (the tests' own config): the default Host said port 0, which
    went to the origin and into the key, where no request could name it; now the port the
    system chose, the one a client that sends Host names (the same page, the same entry)."""
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    port = port_of(proxy)
    first = await send_raw(proxy, request("GET", "/page", version="1.0"))
    assert received(first)["host"] == f"127.0.0.1:{port}"
    named = await send_raw(proxy, get("/page", host=f"127.0.0.1:{port}"))
    assert (named.x_cache, received(named)["host"]) == ("HIT", f"127.0.0.1:{port}")


V6_SPELLINGS = ("[::1]", "[0:0::1]", "[0:0:0:0:0:0:0:1]", "[::0001]", "[0000::1]", "[::0:1]", "[::1]:80",
                "[0::1]:0080")


async def test_an_ipv6_literal_spelt_differently_is_one_key_and_one_host_upstream(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Every spelling of one IPv6 address was its own entry, sent upstream as written."""
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    for spelling in V6_SPELLINGS:
        reply = await send_raw(proxy, get("/page", host=spelling))
        assert reply.status == 200, spelling
        assert received(reply)["host"] == "[::1]", spelling
    absolute = await send_raw(proxy, get("http://[0:0::0:1]/page", host="shop.example"))
    assert (absolute.x_cache, received(absolute)["host"]) == ("HIT", "[::1]")
    assert origin.count("/page") == 1


async def test_an_ipv4_mapped_literal_is_spelt_with_its_dotted_address(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    for spelling in ("[::FFFF:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:0001]"):
        reply = await send_raw(proxy, get("/page", host=spelling))
        assert received(reply)["host"] == "[::ffff:127.0.0.1]", spelling
    assert origin.count("/page") == 1


async def test_brackets_that_hold_no_ipv6_address_are_refused(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    for spelling in ("[1:2:3]", "[::::]", "[1::2::3]", "[::1.2.3]"):
        assert (await send_raw(proxy, get("/page", host=spelling))).status == 400, spelling
        assert (await send_raw(proxy, get(f"http://{spelling}/page"))).status == 400, spelling
    assert origin.count("/page") == 0


async def test_ipv4_spellings_other_than_dotted_decimal_are_kept_as_written(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``127.0.0.01``, ``2130706433``, ``0x7f.1`` are registered names to RFC 3986 and origins
    read them differently (``inet_aton``: octal, hex): the origin gets the spelling the key holds."""
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    for spelling in ("127.0.0.01", "2130706433", "0x7f.1"):
        assert received(await send_raw(proxy, get("/page", host=spelling)))["host"] == spelling
