"""The ``cluster:`` section of the config: where Redis is, this node's name, and the bus's limits.

Declared like every other section (``proxy.schema.setting``): each wrong key, type or
value is one ``FILE:LINE: message``, ``cachegate check`` reports them all, and
docs/configuration.md lists the keys.
Nothing here imports the Redis client: a config without ``cluster:`` never needs it.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, replace
from urllib.parse import unquote, unquote_plus, urlsplit

from yarl import URL

from proxy.schema import (
    Invalid,
    byte_size,
    duration,
    integer,
    setting,
    text,
    unencodable_path,
    url_bracket_problem,
)

KB = 1 << 10
REDIS_SCHEMES = ("redis", "rediss", "unix")
_NODE_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DB = re.compile(r"[0-9]{1,9}")


def _redis_url(value: str) -> str:
    if any(c < " " or c == "\x7f" for c in value):  # a NUL in a unix socket's path: a ValueError at connect
        raise Invalid(f"{redacted(value)!r}: a Redis URL must not contain control characters (percent-encode "
                      "them)")
    problem = url_bracket_problem(re.split(r"[/?#]", value.partition("://")[2], maxsplit=1)[0])
    if problem is not None:
        raise Invalid(f"{redacted(value)!r}: {problem}")
    try:
        url = URL(value)
        ok = url.scheme in REDIS_SCHEMES and (bool(url.host) or url.scheme == "unix")
        ok = ok and not _password_cut(value)
    except ValueError:
        ok = False
    if not ok:
        raise Invalid(f"{redacted(value)!r} is not a Redis URL: use redis://HOST:PORT/DB, "
                      "rediss://HOST:PORT/DB (TLS) or unix:///path/to/redis.sock"
                      + (_ENCODE if "@" in value else ""))
    if url.scheme == "unix":
        # The client connects to this path (percent-decoded): a character the file system
        # encoding cannot write failed at start, "cannot reach Redis", with no FILE:LINE.
        unwritable = unencodable_path(unquote(urlsplit(value).path))
        if unwritable is not None:
            raise Invalid(f"{redacted(value)!r}: the socket path {unwritable}")
    # The client reads the database from the path (or ?db=) and, for a path that is not a
    # number, quietly uses database 0: another cluster's data, maybe.
    db = url.query.get("db")
    if db is None and url.scheme != "unix" and url.path not in ("", "/"):
        db = url.path[1:]
    if db is not None and not _DB.fullmatch(db):
        raise Invalid(f"{redacted(value)!r}: the database {db!r} is not a number: use "
                      "redis://HOST:PORT/DB with DB a number (0 unless you chose another)")
    return value


_ENCODE = ("; a password with / ? # @ or % in it is written percent-encoded "
           "(%2F %3F %23 %40 %25): redis://:PASS%2FWORD@HOST:PORT/DB")


def _password_cut(value: str) -> bool:
    """Whether an '@' lies past where the URL's netloc ends (a '/', '?' or '#' in the password):
    the client would take part of the password for the host, path or query."""
    scheme, _, rest = value.partition("://")
    # (unix: the password is a query parameter, which may hold an '@'; no host to take it for)
    try:
        netloc = urlsplit(value).netloc
    except ValueError:  # (what urlsplit cannot read, the client cannot either)
        return True
    return scheme != "unix" and rest.count("@") != netloc.count("@")


def _node_name(value: str) -> str:
    if value and not _NODE_NAME.fullmatch(value):  # empty: HOSTNAME:PORT (``with_node_name``)
        raise Invalid(f"{value!r}: use letters, digits and . _ - : @ (at most 200)")
    return value


def _namespace(value: str) -> str:
    if ":" in value:
        # Keys are NAMESPACE:purges, NAMESPACE:l2:gen, ...: with ':' allowed, 'shop' and
        # 'shop:l2' would name the same keys (and each break the other's).
        raise Invalid(f"{value!r}: no ':' in a namespace: cachegate puts its own ':'-separated "
                      "names under it, so one namespace could name another's keys (use . _ or -)")
    if not _NAMESPACE.fullmatch(value):
        raise Invalid(f"{value!r}: use letters, digits and . _ - (at most 64)")
    return value


@dataclass(frozen=True)
class ClusterSettings:
    """Cluster mode: nodes that share a Redis (or Valkey) purge, fill and coalesce as one cache
    (docs/cluster.md). Without this section a node runs alone and never imports a Redis client."""

    redis: str = setting(doc="where Redis is: redis://HOST:PORT/DB (DB a number), rediss://HOST:PORT/DB "
                             "(TLS) or unix:///path/to/redis.sock",
                         parse=text(strict=True, check=_redis_url, kind="Redis URL"),
                         missing=" (e.g. redis://127.0.0.1:6379/0)")
    node: str = setting("", "this node's name in the cluster (empty: HOSTNAME:PORT of the first client "
                            "listener)", text(check=_node_name))
    namespace: str = setting("cachegate", "prefix of every Redis key (letters, digits, . _ -; no ':'): "
                                          "several clusters may share one Redis",
                             text(check=_namespace))
    ack_timeout: float = setting(2.0, "how long a purge waits for the other nodes' acknowledgements",
                                 duration(positive=True))
    shared_cache: bool = setting(False, "Redis as a shared tier too, with one origin request per key "
                                        "cluster-wide")
    shared_max_object: int = setting(256 * KB, "bigger bodies stay in each node's own tiers (each node "
                                               "fetches them, without waiting for another's download)",
                                     byte_size())
    required: bool = setting(True, "false: start and serve alone when Redis cannot be reached at start")
    stream_max: int = setting(100_000, "purge stream entries kept (older ones are trimmed)",
                              integer(minimum=100))
    # Both bounded: a node's heartbeat key lives max(3 beats, a beat and two timeouts), and a node
    # restarted after a crash waits that long for its old key to expire (so do purges that count
    # it live meanwhile): at most 30 s.
    heartbeat: float = setting(1.0, "how often a node says it is alive (it is gone after 3 missed beats, "
                                    "or a beat and two timeouts)",
                               duration(positive=True, maximum=10.0))
    timeout: float = setting(1.0, "a Redis call slower than this (a new connection's set-up included) counts "
                                  "as Redis being unreachable",
                             duration(positive=True, maximum=10.0))

    @property
    def redacted_url(self) -> str:
        """The Redis URL without its password, for messages and ``GET /cluster``."""
        return redacted(self.redis)

    def with_node_name(self, listen_port: int) -> ClusterSettings:
        """The default node name, ``HOSTNAME:PORT`` of the first client listener, filled in."""
        return self if self.node else replace(self, node=f"{socket.gethostname()}:{listen_port}")


# Query parameters whose values a message shows: settings of redis-py's that hold no secret. Every
# other parameter's value is masked, whatever its name: redis-py passes any parameter of the URL
# on to its connection (``password``, ``ssl_password``, ``credential_provider``, ... and names of
# its releases to come), so a list of secret names would be one release behind.
SHOWN_PARAMS = frozenset({
    "db", "protocol", "username", "client_name", "socket_timeout", "socket_connect_timeout",
    "socket_keepalive", "retry_on_timeout", "max_connections", "health_check_interval",
    "ssl_cert_reqs", "ssl_check_hostname", "timeout",
})
MASK = "***"


def redacted(url: str) -> str:
    """``url`` as messages, logs, ``/healthz`` and ``GET /cluster`` show it: a password in it,
    in the userinfo or in the query (``unix:///run/redis.sock?password=...``, redis-py's way for
    a socket), never shown. Everything between ``://`` and the text's last ``@`` is userinfo
    here, found before any parsing: a password holding ``/ ? #`` (unencoded) ends the netloc
    for ``urllib.parse``, which then saw no userinfo and showed it all. The userinfo's password
    is masked (its whole userinfo when it has no ':', most likely a password written without its
    ':'), and so are the value of every query parameter but ``SHOWN_PARAMS``, and a fragment.

    >>> redacted("unix:///run/r.sock?db=0&password=S3CRET&ssl_password=x")
    'unix:///run/r.sock?db=0&password=***&ssl_password=***'
    >>> redacted("redis://user:pw@10.0.0.5:6379/2?pass%77ord=pw"), redacted("redis://pw@h:1/0")
    ('redis://user:***@10.0.0.5:6379/2?pass%77ord=***', 'redis://***@h:1/0')
    >>> redacted("redis://:Zm9v/YmFy@h:1/0"), redacted("redis://u:p?s#s@h:1/0")
    ('redis://:***@h:1/0', 'redis://u:***@h:1/0')
    >>> redacted("unix:///r.sock?db=0&password=S3CRET:tail@x")
    'unix://***@x'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo = ""
    if "@" in rest:
        secret, _, rest = rest.rpartition("@")
        user, colon, _ = secret.partition(":")
        # A "user" holding / ? # = & is no user name: the '@' was in a query (a socket's
        # ?password=...:...@...), or a password's unencoded reserved character came first.
        shown = colon and not any(c in user for c in "/?#=&")
        userinfo = f"{user}:{MASK}@" if shown else f"{MASK}@"
    try:
        parts = urlsplit(f"{scheme}{sep}{rest}")
    except ValueError:
        return "(a URL that cannot be read: not shown, it may hold a password)"
    query = "&".join(_masked_param(p) for p in parts.query.split("&")) if parts.query else ""
    start = f"{parts.scheme}://" if sep else ""
    return (f"{start}{userinfo}{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{MASK}" if parts.fragment else ""))


def _masked_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}={MASK}" if eq and value and unquote_plus(name) not in SHOWN_PARAMS else param
