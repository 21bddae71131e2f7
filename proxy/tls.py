"""TLS on the client side: one server ``SSLContext`` per TLS listener, and certificate rotation.

Contexts take the standard library's secure defaults for a server
(``ssl.create_default_context(Purpose.CLIENT_AUTH)``: no compression, OpenSSL's current
cipher list, no renegotiation), TLS 1.2 at least, and ALPN ``http/1.1`` (cachegate speaks
HTTP/1.1; a client that offers h2 is told so during the handshake instead of guessing).

The files are read once, by the config load that checks them (``Settings.pem``): the bytes
checked are the bytes served, and with several workers the supervisor's copy of them
(``proxy.supervisor.ConfigCopy``) is what a restarted worker serves, whatever the files hold
by then. Rotation without a restart (SIGHUP, ``POST /reload``): a listening server keeps the
``SSLContext`` it was started with, so that context stays, and the new certificate chain and
key are loaded into it once they have loaded into a fresh context (the same bytes, through a
private temporary folder: a file replaced between the two loads cannot leave the live context
half-loaded). OpenSSL copies a context's certificate into each
connection when the connection is made: a connection already open keeps the certificate it
shook hands with, so it goes on working; new handshakes present the new certificate. There is
no SNI callback: CPython decodes the client's server name as ASCII before calling one, and a
name that is not ASCII (anyone can send one) then printed a traceback to stderr per handshake.

A reload whose files do not load (a key that does not match
its certificate, a half-copied file, a key that needs a passphrase) leaves the current context
in place: the config check loads them first, and refuses the reload. A key of another type
than the running one (RSA to EC) leaves it in place too, and the reload's answer names the
listener in ``restart_required``. cachegate never asks for
a passphrase: OpenSSL's default would ask on the controlling terminal and block the process.

A certificate that loads may still be refused by every client: expired, not valid yet, or about
to expire. The config load reads the leaf's dates (``certificate_dates``) and warns of it at the
``cert`` line (``check``, a start and a reload, whose answer lists it in ``warnings``;
``check --strict`` refuses it), and each listener exports the end of the validity of the
certificate it serves (``cachegate_tls_certificate_expiry_seconds``): a renewal hook that
copied an old file used to look like a success. While a process runs, ``ExpiryWatch`` logs
the same words as the certificates it serves enter their last 14 days or expire, and daily
after: a process that ran for weeks without a reload said nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from proxy.yamlsrc import read_regular

log = logging.getLogger("cachegate.tls")


ENCRYPTED_KEY = ("the key is encrypted (cachegate needs an unencrypted key: it never asks for a "
                 "passphrase; write one with `openssl pkey -in KEY -out KEY.plain` and make it "
                 "readable by cachegate's user only)")


class EncryptedKey(ssl.SSLError):
    """The key needs a passphrase: ``load_cert_chain`` asked for one."""


def _no_passphrase() -> str:
    # Without ``password=``, OpenSSL's default callback would ask on the controlling terminal,
    # blocking ``cachegate check``, a start, and a reload on the event loop until someone types.
    raise EncryptedKey(ENCRYPTED_KEY)


def pem_is_encrypted(data: bytes) -> bool:
    """Whether these PEM bytes hold an encrypted private key (PKCS#8 ``ENCRYPTED PRIVATE KEY``
    or a traditional key with ``Proc-Type: 4,ENCRYPTED``)."""
    head = data[:1 << 20]
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in head or b"Proc-Type: 4,ENCRYPTED" in head


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for this certificate chain and key; ``ssl.SSLError`` or ``OSError``
    (with the reason) when they do not load, ``EncryptedKey`` when the key needs a passphrase."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key, password=_no_passphrase)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_pem(cert: str, key: str) -> tuple[bytes, bytes]:
    """The bytes of the certificate chain and key files; OSError when one cannot be read. Regular
    files only, opened without blocking: a FIFO's open waits for a writer (``check`` hung, a
    reload blocked the event loop and every listener with it)."""
    return read_regular(cert), read_regular(key)


def pem_file_problem(path: str, exc: OSError) -> str:
    """Why a TLS listener's certificate or key file cannot be read, naming it: OpenSSL's own
    words ("No such file or directory") said neither which file it was nor what is wrong."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return missing_file(path)
    if os.path.isdir(path):
        return f"{path} is a directory (a PEM file is expected)"
    return f"cannot read {path}: {exc.strerror or exc}"


def missing_file(path: str) -> str:
    """``path`` does not exist, said so; a symbolic link whose target is missing (certbot's
    ``live/`` links into ``archive/``, pruned or not copied along) is named with its target:
    "does not exist" of a path ``ls`` shows sent people looking at the wrong file."""
    try:
        target = os.readlink(path)
    except OSError:  # not a link (or a folder on the way is missing)
        return f"{path} does not exist"
    final = os.path.realpath(path)
    through = "" if final == target else f" ({final})"
    return f"{path} is a symbolic link to {target}{through}, which does not exist"


@contextlib.contextmanager
def _pem_files(*pem: bytes) -> Iterator[list[str]]:
    """Files holding these PEM bytes, for the whole ``with``. OpenSSL loads PEM from files only,
    and some of it only there ('TRUSTED CERTIFICATE' blocks, which ``cadata`` skips): they go to
    a private temporary folder (0700, files 0600: one may hold a private key), removed at once."""
    with tempfile.TemporaryDirectory(prefix="cachegate-tls-") as folder:
        copies: list[str] = []
        for n, data in enumerate(pem):
            copy = os.path.join(folder, f"{n}.pem")
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as dst:
                dst.write(data)
            copies.append(copy)
        yield copies


def _load_pem(pem: tuple[bytes, bytes], into: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """A server context from these bytes (or ``into`` loaded with them once a fresh context took
    them: all or nothing), through ``_pem_files``."""
    with _pem_files(*pem) as (cert, key):
        ctx = server_context(cert, key)
        if into is None:
            return ctx
        into.load_cert_chain(cert, key, password=_no_passphrase)
        return into


def load_problem(cert: str, key: str, pem: tuple[bytes, bytes]) -> str | None:
    """Why this certificate and key would not load, or None when they do (for ``cachegate check``);
    ``pem``: their bytes as read already (what a listener will be started with). OpenSSL never
    opens the paths themselves: a FIFO there would block it for good."""
    try:
        _load_pem(pem)
    except EncryptedKey:
        return f"cannot load the certificate {cert} with the key {key}: {ENCRYPTED_KEY}"
    except ssl.SSLError as exc:  # before OSError: an SSLError is one
        reason = what_went_wrong(cert, key, pem) or exc
        return f"cannot load the certificate {cert} with the key {key}: {reason}"
    except OSError as exc:  # the temporary copies (a full /tmp)
        return f"cannot load the certificate {cert} with the key {key}: {exc.strerror or exc}"
    return None


_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_CERTIFICATE_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)-----END CERTIFICATE-----", re.S)


def what_went_wrong(cert: str, key: str, pem: tuple[bytes, bytes]) -> str | None:
    """What the files hold (``pem``: their bytes, as the load read them: never opened again),
    when that explains a failed load that OpenSSL words as ``[SSL] PEM lib`` (a file without the
    PEM block it should hold: the two swapped, the certificate given for both; a half-copied
    file) or ``no certificate assigned`` (a key of another type than the certificate's); None
    when it does not (OpenSSL's words are then the best there are). Asked only after a load
    failed: nothing is spent on files that load."""
    cert_data, key_data = pem[0][:1 << 20], pem[1][:1 << 20]
    has_cert, has_key = _CERTIFICATE in cert_data, _PRIVATE_KEY.search(key_data) is not None
    if not has_cert and not has_key and _PRIVATE_KEY.search(cert_data) and _CERTIFICATE in key_data:
        return (f"the two are swapped: {cert} (tls.cert) holds a private key and {key} (tls.key) a "
                "certificate")
    for path, field, data, has in ((cert, "cert", pem[0], has_cert), (key, "key", pem[1], has_key)):
        der = None if has else der_kind(data)
        if der is not None:
            tool = "x509" if der == "certificate" else "pkey"
            return (f"{path} (tls.{field}) is a DER {der}, not PEM: convert it with `openssl {tool} "
                    f"-inform DER -in {path} -out {path}.pem` and name that file")
    if not has_cert:
        return f"{cert} (tls.cert) holds no certificate (-----BEGIN CERTIFICATE-----): {_holds(cert_data)}"
    if not has_key:
        return f"{key} (tls.key) holds no private key (-----BEGIN PRIVATE KEY-----): {_holds(key_data)}"
    for path, field, data in ((cert, "cert", cert_data), (key, "key", key_data)):
        broken = _broken_block(data)
        if broken is not None:
            return f"{path} (tls.{field}) holds {broken}"
    owner = _key_owner(pem)  # first: the first certificate's key type is then not the key's own
    if owner is not None:
        return (f"the key belongs to certificate {owner} of {cert}, not to the first: the server's "
                "certificate must come first, then the certificates that signed it (a chain in the "
                "wrong order, or another certificate put before it)")
    cert_kind, kind = certificate_key_kind(cert_data), key_kind(key_data)
    if "unknown" not in (cert_kind, kind) and cert_kind != kind:
        return (f"the certificate in {cert} has an {cert_kind} key but {key} is an {kind} key: the key "
                "must be the certificate's own")
    return None


def _key_owner(pem: tuple[bytes, bytes]) -> int | None:
    """Which later certificate of the chain (2, 3, ...) the key belongs to, when not to the
    first: OpenSSL serves the file's first certificate and says only ``KEY_VALUES_MISMATCH``
    of an intermediate put before the server's certificate. Each later one is tried with the
    key (through ``_pem_files``); asked only after a load failed."""
    blocks = [m.group(0) for m in _CERTIFICATE_BLOCK.finditer(pem[0][:1 << 20])]
    for n, block in enumerate(blocks[1:16], 2):
        try:
            with _pem_files(block + b"\n", pem[1]) as (cert, key):
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    cert, key, password=_no_passphrase)
        except (ssl.SSLError, OSError):
            continue
        return n
    return None


def der_kind(data: bytes) -> str | None:
    """"certificate" or "private key" when ``data`` is one DER structure (a SEQUENCE whose
    length is the file's: ``openssl ... -outform DER``, a Windows ``.cer``), else None; its
    first element tells which: a certificate's is a SEQUENCE (``tbsCertificate``), a key's
    (PKCS#1, PKCS#8, SEC1) an INTEGER (its version). OpenSSL said only that the file holds no
    PEM.

    >>> der_kind(bytes([0x30, 0x82, 0x00, 0x04, 0x30, 0x02, 0x05, 0x00]))
    'certificate'
    >>> der_kind(bytes([0x30, 0x03, 0x02, 0x01, 0x00])), der_kind(bytes([0x30, 0x03]) + b"abcd")
    ('private key', None)
    """
    if len(data) < 4 or data[0] != 0x30:
        return None
    size, head = data[1], 2
    if size & 0x80:  # the long form: the next (size & 0x7F) bytes hold the length
        width = size & 0x7F
        if not 1 <= width <= 4 or len(data) < 2 + width:
            return None
        size, head = int.from_bytes(data[2:2 + width], "big"), 2 + width
    if head + size != len(data) or head >= len(data):
        return None
    return {0x30: "certificate", 0x02: "private key"}.get(data[head])


_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def _broken_block(data: bytes) -> str | None:
    """The first PEM block of ``data`` that a half-copied file leaves: one without its END line,
    or whose base64 does not decode; None when every block is whole.

    >>> _broken_block(b"-----BEGIN CERTIFICATE-----\\nMIIB")
    'a certificate block that is cut short (no -----END CERTIFICATE-----)'
    >>> _broken_block(b"-----BEGIN PRIVATE KEY-----\\nMII*\\n-----END PRIVATE KEY-----\\n")
    'a private key block whose base64 does not decode (a half-copied or edited file?)'
    """
    import base64
    import binascii

    at = 0
    while (begin := _BEGIN.search(data, at)) is not None:
        label = begin.group(1)
        end = data.find(b"-----END " + label + b"-----", begin.end())
        name = _block_name(label.decode())
        if end < 0:
            return f"{name} block that is cut short (no -----END {label.decode()}-----)"
        body = b"".join(line for line in data[begin.end():end].split(b"\n") if b":" not in line)
        try:
            base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except (binascii.Error, ValueError):
            return f"{name} block whose base64 does not decode (a half-copied or edited file?)"
        at = end
    return None


def _block_name(label: str) -> str:
    if label == "CERTIFICATE":
        return "a certificate"
    if label.endswith("PRIVATE KEY"):
        return "a private key"
    return f"a {label}"


def _holds(data: bytes) -> str:
    if not data.strip():
        return "the file is empty"
    if _PRIVATE_KEY.search(data):
        return "it holds a private key"
    if _CERTIFICATE in data:
        return "it holds a certificate"
    return "it holds no PEM block cachegate knows"


def certificate_key_kind(data: bytes) -> str:
    """The algorithm of the first PEM certificate's public key ("RSA", "EC", ...; "unknown").
    RSA and EC first: their key OIDs are never signature algorithms, Ed25519's is both (a
    certificate signed by an Ed25519 CA holds its OID whatever its own key)."""
    import base64

    m = _CERTIFICATE_BLOCK.search(data)
    if m is None:
        return "unknown"
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", m.group(1)))
    except ValueError:
        return "unknown"
    found = {kind for oid, kind in _KEY_OIDS if oid in der}
    return next((k for k in ("RSA", "EC", "Ed25519", "Ed448", "RSA-PSS") if k in found), "unknown")


def client_context(ca: bytes | None) -> ssl.SSLContext:
    """The context upstream certificates are checked with: the system's CAs, or only those in
    ``ca`` (the PEM bytes of ``upstream.tls.ca_file`` as the config load read them: as nginx's
    proxy_ssl_trusted_certificate and curl's --cacert, they replace the system's, never add to
    them). Raises ``ssl.SSLError`` when ``ca`` holds no certificate: ``ca_file_problem``."""
    if ca is None:
        return ssl.create_default_context()
    # An empty file is no CA file for OpenSSL either way; refused rather than the system's CAs.
    if not ca:
        raise ssl.SSLError("no certificate: the file is empty")
    # Loaded as a file (of the bytes the load read), not as ``cadata``: ``cadata`` reads only
    # '-----BEGIN CERTIFICATE-----' blocks and skips OpenSSL's 'BEGIN TRUSTED CERTIFICATE' ones
    # (``openssl x509 -addtrust``; RHEL's ca-bundle.trust.crt) without a word, which nginx, curl
    # and ``cafile`` take: a bundle of both then trusted only some of its CAs (502s).
    with _pem_files(ca) as (path,):
        return ssl.create_default_context(cafile=path)


def ca_file_problem(path: str, read: bytes | OSError) -> str | None:
    """Why ``path`` cannot be ``upstream.tls.ca_file``, or None when it holds a CA certificate;
    ``read``: its bytes, or why reading it failed. OpenSSL's own words for a file that holds none
    (garbage, empty, a private key) name no file (``[X509: NO_CERTIFICATE_OR_CRL_FOUND]``)."""
    if isinstance(read, OSError):
        if isinstance(read, (FileNotFoundError, NotADirectoryError)):
            return missing_file(path)
        if os.path.isdir(path):
            return (f"no CA certificate in {path}: it is a directory (a PEM file of CA certificates "
                    "is expected)")
        return f"cannot read {path}: {read.strerror or read}"
    try:
        client_context(read)
    except ssl.SSLError:
        return (f"no CA certificate in {path} (a PEM file of one or more "
                "'-----BEGIN CERTIFICATE-----' blocks is expected)")
    return None


# Key algorithms by their object identifier, as DER bytes inside a PKCS#8 key.
_KEY_OIDS = ((b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", "RSA"),
             (b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0a", "RSA-PSS"),
             (b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01", "EC"),
             (b"\x06\x03\x2b\x65\x70", "Ed25519"), (b"\x06\x03\x2b\x65\x71", "Ed448"))


def key_kind(data: bytes) -> str:
    """The algorithm of a PEM private key ("RSA", "EC", ...; "unknown" when it cannot be told).

    Why it matters: OpenSSL keeps one certificate per key type in a context, so loading an EC
    pair into a context that holds an RSA one adds a certificate beside the old one instead of
    replacing it, and clients that negotiate RSA keep getting the old certificate.

    >>> key_kind(b"-----BEGIN EC PRIVATE KEY-----\\nMHcC\\n-----END EC PRIVATE KEY-----\\n")
    'EC'
    """
    import base64

    m = re.search(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----\s*(.*?)-----END", data, re.S)
    if m is None:
        return "unknown"
    label = m.group(1).strip().decode()
    if label:  # a traditional key names its type
        return label
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", m.group(2)))
    except ValueError:
        return "unknown"
    head = der[:40]  # the AlgorithmIdentifier comes first, after the version
    return next((kind for oid, kind in _KEY_OIDS if oid in head), "unknown")


# -- the leaf's validity ------------------------------------------------------------------------

EXPIRES_SOON = 14 * 86400  # a warning this long before the end of a certificate's validity


def certificate_dates(cert_pem: bytes) -> tuple[float, float] | None:
    """When the chain's first certificate (the one served, the leaf) becomes valid and stops
    being valid (notBefore, notAfter), as Unix times; None when it cannot be read.

    The standard library has no public way to read a certificate outside a handshake, the
    ``cryptography`` package is not a dependency, and a reload must not run ``openssl`` (a
    subprocess on the event loop): CPython's ``_ssl._test_decode_cert`` (what
    ``SSLSocket.getpeercert`` returns, for a PEM file; there since Python 3.4, used by its own
    tests) reads it through ``_pem_files``, and ``ssl.cert_time_to_seconds`` its dates. Where it
    is missing (another Python), None: nothing is said, nothing is refused."""
    decode = getattr(importlib.import_module("_ssl"), "_test_decode_cert", None)
    first = _CERTIFICATE_BLOCK.search(cert_pem[:1 << 20])
    if decode is None or first is None:
        return None
    try:
        with _pem_files(first.group(0) + b"\n") as (path,):
            fields = decode(path)
        return (ssl.cert_time_to_seconds(fields["notBefore"]),
                ssl.cert_time_to_seconds(fields["notAfter"]))
    except (ssl.SSLError, OSError, ValueError, KeyError, TypeError):
        return None


def validity_problem(cert: str, dates: tuple[float, float], now: float) -> str | None:
    """What is wrong with a certificate valid from ``dates[0]`` to ``dates[1]`` at ``now`` (Unix
    times): expired, not valid yet, or expiring within ``EXPIRES_SOON``; None when nothing is.

    >>> validity_problem("c.pem", (0.0, 1580515200.0), 1580515200.0 + 3 * 86400).partition(")")[0]
    'the certificate in c.pem expired on 2020-02-01 00:00:00 UTC (3 days ago'
    >>> validity_problem("c.pem", (0.0, 100 * 86400.0), 90 * 86400.0 + 3600).split(" UTC")[1]
    ', in 9 days: renew it before then (clients refuse it from then on)'
    >>> validity_problem("c.pem", (0.0, 100 * 86400.0), 80 * 86400.0) is None
    True
    """
    not_before, not_after = dates
    state = validity(dates, now)
    if state == "expired":
        return (f"the certificate in {cert} expired on {_utc(not_after)} ({_span(now - not_after)} "
                "ago): clients refuse it, every handshake fails; put the renewed certificate in "
                "place (did a renewal copy an old file?)")
    if state == "not yet valid":
        return (f"the certificate in {cert} is not valid before {_utc(not_before)} (in "
                f"{_span(not_before - now)}): clients refuse it until then (is this machine's "
                "clock right?)")
    if state == "expires soon":
        return (f"the certificate in {cert} expires on {_utc(not_after)}, in {_span(not_after - now)}: "
                "renew it before then (clients refuse it from then on)")
    return None


Validity = Literal["expired", "not yet valid", "expires soon"]


def validity(dates: tuple[float, float], now: float) -> Validity | None:
    """Which of ``validity_problem``'s problems a certificate valid from ``dates[0]`` to
    ``dates[1]`` has at ``now``, or None.

    >>> [validity((10.0, 20.0 + EXPIRES_SOON), t) for t in (5.0, 15.0, 20.0, 25.0 + EXPIRES_SOON)]
    ['not yet valid', None, 'expires soon', 'expired']
    """
    not_before, not_after = dates
    if now > not_after:
        return "expired"
    if now < not_before:
        return "not yet valid"
    if not_after - now <= EXPIRES_SOON:
        return "expires soon"
    return None


def _marks(dates: tuple[float, float]) -> tuple[float, ...]:
    """The moments ``validity`` changes: valid from, the start of ``EXPIRES_SOON``, expired."""
    return dates[0], dates[1] - EXPIRES_SOON, dates[1]


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _span(seconds: float) -> str:
    """A duration in whole days (hours, minutes under two of the larger unit), rounded down.

    >>> _span(9.9 * 86400), _span(30 * 3600), _span(59)
    ('9 days', '30 hours', '0 minutes')
    """
    for unit, name in ((86400, "days"), (3600, "hours")):
        if seconds >= 2 * unit:
            return f"{int(seconds // unit)} {name}"
    minutes = int(max(seconds, 0) // 60)
    return f"{minutes} minute{'' if minutes == 1 else 's'}"


def served_after_reload(served: tuple[bytes, bytes] | None,
                        loaded: tuple[bytes, bytes] | None) -> tuple[bytes, bytes] | None:
    """The certificate and key a running TLS listener serves after a reload that loaded
    ``loaded``: those, unless the key is of another type, which ``ServerTLS.reload`` refuses
    (the old pair stays until a restart). A supervisor keeps it, so that a worker it restarts
    serves what its siblings serve, not the pair they refused.

    >>> served_after_reload((b"c1", b"-----BEGIN RSA PRIVATE KEY-----x-----END"),
    ...                     (b"c2", b"-----BEGIN EC PRIVATE KEY-----y-----END"))[0]
    b'c1'
    >>> served_after_reload((b"c1", b"-----BEGIN RSA PRIVATE KEY-----x-----END"),
    ...                     (b"c2", b"-----BEGIN RSA PRIVATE KEY-----y-----END"))[0]
    b'c2'
    """
    if served is None or loaded is None or key_kind(loaded[1]) == key_kind(served[1]):
        return loaded
    return served


class ServerTLS:
    """A TLS listener's context (``context``: what the listener is started with), into which
    ``reload`` loads a new certificate chain and key of the same key type. ``pem``: the files'
    bytes as the config load read and checked them (``Settings.pem``): with several workers,
    the supervisor's copy, so that a restarted worker serves its siblings' certificate whatever
    the files hold now (``proxy.supervisor.ConfigCopy``); None reads the files."""

    def __init__(self, cert: str, key: str, pem: tuple[bytes, bytes] | None = None) -> None:
        pem = pem if pem is not None else read_pem(cert, key)
        self.context = _load_pem(pem)
        self.files = (cert, key)
        self.kind = key_kind(pem[1])
        self.cert_pem = pem[0]  # the certificate chain served (``ExpiryWatch`` reads its dates)
        # notAfter of the certificate served, a Unix time (None: unreadable): the metric
        # cachegate_tls_certificate_expiry_seconds (proxy.web.server)
        self.not_after = _not_after(pem[0])

    def reload(self, cert: str, key: str, pem: tuple[bytes, bytes] | None = None) -> str | None:
        """Load the new files (they may be new files at the same paths; ``pem``: their bytes as
        the reload's config load read them); None when the new certificate is in use for new
        handshakes, else why the old one stays (logged): the reload's answer names it in
        ``restart_required``, so a renewal hook sees it."""
        if pem is None:  # settings not made by a load: regular files only, never a FIFO's wait
            try:
                pem = read_pem(cert, key)
            except OSError as exc:
                path = exc.filename if isinstance(exc.filename, str) else cert
                field = "key" if path == key != cert else "cert"
                why = f"tls.{field}: {pem_file_problem(path, exc)}"
                log.error("TLS reload failed, the current certificate stays: %s", why)
                return f"the current certificate stays: {why}"
        try:
            kind = key_kind(pem[1])
            if kind != self.kind:
                _load_pem(pem)  # a pair that does not load says so first
                log.error("TLS reload refused, the current certificate stays: %s is a %s key, the "
                          "running one %s: restart cachegate to change the key type (OpenSSL "
                          "keeps one certificate per key type: the old one would still be served "
                          "to clients of its type)", key, kind, self.kind)
                return (f"the key is {kind}, the certificate served has an {self.kind} key: "
                        "a restart changes the key type")
            # All or nothing: the live context is not touched unless the same bytes loaded.
            _load_pem(pem, into=self.context)
        except EncryptedKey:
            log.error("TLS reload failed, the current certificate stays: %s: %s", key, ENCRYPTED_KEY)
            return f"the current certificate stays: {ENCRYPTED_KEY}"
        except (ssl.SSLError, OSError) as exc:
            reason = (what_went_wrong(cert, key, pem) if isinstance(exc, ssl.SSLError) else None) or exc
            log.error("TLS reload failed, the current certificate stays: %s: %s", cert, reason)
            return f"the current certificate stays: {cert} did not load ({reason})"
        self.files = (cert, key)
        self.cert_pem = pem[0]
        self.not_after = _not_after(pem[0])
        return None


def _not_after(cert_pem: bytes) -> float | None:
    dates = certificate_dates(cert_pem)
    return None if dates is None else dates[1]



# -- the leaf's validity, while running ---------------------------------------------------------

RECHECK = 12 * 3600  # how often a running process reads the dates of the certificates it serves
REPEAT = 86400  # one certificate's warning (of one problem) at most this often
_EARLY = 60.0  # a timer that fires this much early (or a clock that drifts) still counts a day

# (the listener, its ``cert`` file, the certificate's PEM bytes as served), per TLS listener
Served = Callable[[], Iterable[tuple[str, str, bytes]]]


class ExpiryWatch:
    """``validity_problem`` of each certificate a running process serves, again while it runs.

    The config load checks it at a start and a reload only: a process that ran for weeks
    without either said nothing as its certificate came within ``EXPIRES_SOON`` of its end or
    expired (the metric alone did). Every ``RECHECK``, and just after each moment a
    certificate's ``validity`` changes (``_marks``), a problem is logged as a WARNING, each
    (listener, certificate, problem) at most once per ``REPEAT``: a renewed certificate, or
    one that expired after it was about to, is said at once.

    Run by the process that logs the config's warnings at a start and a reload (a lone
    process, or the supervisor: its workers serve the same certificates and stay silent), with
    ``served`` its TLS listeners; ``said`` after each reload (and, by ``run``, the start): the
    config load has just logged those problems, so the watch does not repeat them that day."""

    def __init__(self, served: Served, clock: Callable[[], float] = time.time) -> None:
        self._served = served
        self._clock = clock
        self._warned: dict[tuple[str, float, Validity], float] = {}  # -> when it was logged
        self._woken = asyncio.Event()
        self._wait = float(RECHECK)

    def _dated(self) -> list[tuple[str, str, tuple[float, float]]]:
        return [(listener, cert, dates) for listener, cert, pem in self._served()
                if (dates := certificate_dates(pem)) is not None]

    @staticmethod
    def _until_next(dated: list[tuple[str, str, tuple[float, float]]], now: float) -> float:
        """Seconds until the next check: ``RECHECK``, or just after a mark that comes before."""
        return min([float(RECHECK), *(mark + 1 - now for *_, dates in dated for mark in _marks(dates)
                                      if mark + 1 > now)])

    def said(self) -> None:
        """The config load has just logged the problem of each certificate served (a start, a
        reload): not again before ``REPEAT``; the next check is rescheduled for what is served
        now."""
        now = self._clock()
        dated = self._dated()
        for listener, _cert, dates in dated:
            state = validity(dates, now)
            if state is not None:
                self._warned[(listener, dates[1], state)] = now
        self._wait = self._until_next(dated, now)
        self._woken.set()

    def check(self) -> float:
        """Log each problem not logged within ``REPEAT``; the seconds until the next check."""
        now = self._clock()
        dated = self._dated()
        current: set[tuple[str, float, Validity]] = set()
        for listener, cert, dates in dated:
            state = validity(dates, now)
            if state is None:
                continue
            key = (listener, dates[1], state)
            current.add(key)
            last = self._warned.get(key)
            if last is None or now - last >= REPEAT - _EARLY:
                self._warned[key] = now
                log.warning("TLS listener %s: %s", listener, validity_problem(cert, dates, now))
        for gone in self._warned.keys() - current:  # renewed, or its state passed
            del self._warned[gone]
        return self._until_next(dated, now)

    async def run(self) -> None:
        """``check`` for ever (until cancelled), the first time ``RECHECK`` after the start (or
        just after a mark before that): the start's config load has just warned."""
        self.said()
        while True:
            self._woken.clear()
            try:
                await asyncio.wait_for(self._woken.wait(), self._wait)
            except TimeoutError:
                self._wait = self.check()
