"""The cluster: section: defaults, FILE:LINE problems, ``cachegate check``, and a config without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError


def write(tmp_path: Path, cluster: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:8080\nupstreams: [{url: 'http://127.0.0.1:9000'}]\ncache: {disk: null}\n"
                    + cluster)
    return str(path)


def test_without_a_cluster_section_there_is_no_cluster_and_no_redis_client_is_imported(tmp_path: Path) -> None:
    code = ("import sys; from proxy.config import load_config; import proxy.web.server, proxy.supervisor; "
            f"s = load_config({write(tmp_path, '')!r}); print(s.cluster, 'redis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]


def test_the_section_takes_its_defaults_and_the_node_name_defaults_to_host_and_port(tmp_path: Path) -> None:
    import socket

    s = load_config(write(tmp_path, "cluster:\n  redis: redis://:secret@10.0.0.5:6379/2\n"))
    c = s.cluster
    assert c is not None
    assert (c.redis, c.node, c.namespace, c.ack_timeout, c.shared_cache, c.shared_max_object, c.required) == (
        "redis://:secret@10.0.0.5:6379/2", f"{socket.gethostname()}:8080", "cachegate", 2.0, False, 256 * 1024,
        True)
    assert c.redacted_url == "redis://:***@10.0.0.5:6379/2"


@pytest.mark.parametrize(("section", "line", "message"), [
    ("cluster:\n  node: a\n", 4, "cluster.redis: required"),
    ("cluster:\n  redis: http://127.0.0.1:6379\n", 5, "is not a Redis URL"),
    ("cluster:\n  redis: redis://h:1\n  ack_timeout: soon\n", 6, "cluster.ack_timeout: bad duration"),
    ("cluster:\n  redis: redis://h:1\n  shared_max_object: big\n", 6, "cluster.shared_max_object: bad size"),
    ("cluster:\n  redis: redis://h:1\n  shared_cache: yes please\n", 6, "cluster.shared_cache: expected true or false"),
    ("cluster:\n  redis: redis://h:1\n  node: 'a b'\n", 6, "cluster.node: 'a b'"),
    ("cluster:\n  redis: redis://h:1\n  ack_timout: 2s\n", 6, "unknown key 'cluster.ack_timout' (did you mean 'ack_timeout'?)"),
    ("cluster:\n  redis: redis://h:1\n  stream_max: 5\n", 6, "cluster.stream_max: must be at least 100"),
    ("cluster: redis://h:1\n", 4, "cluster: expected a mapping"),
])
def test_every_mistake_is_reported_with_its_file_and_line(tmp_path: Path, section: str, line: int,
                                                          message: str) -> None:
    path = write(tmp_path, section)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith(f"{path}:{line}: ") and message in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(("url", "ok"), [
    ("redis://h:1/abc", False), ("redis://h:1/0/1", False), ("redis://h:1/2?db=x", False),
    ("unix:///run/redis.sock?db=one", False), ("redis://h:1/", True), ("redis://h:1", True),
    ("redis://h:1/15", True), ("rediss://:pw@h:1/3", True), ("unix:///run/redis.sock?db=2", True),
])
def test_a_database_that_is_not_a_number_is_refused(tmp_path: Path, url: str, ok: bool) -> None:
    # The client would quietly use database 0 for it.
    path = write(tmp_path, f"cluster:\n  redis: '{url}'\n")
    if ok:
        load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith(f"{path}:5: cluster.redis: ")
            and "is not a number" in p], info.value.problems


@pytest.mark.parametrize(("namespace", "ok"), [("shop:l2", False), ("a:", False), ("shop", True),
                                               ("shop.l2", True), ("shop_l2-x", True)])
def test_a_namespace_with_a_colon_is_refused(tmp_path: Path, namespace: str, ok: bool) -> None:
    # 'shop' and 'shop:l2' would name the same keys ('shop:l2:purges' is both).
    path = write(tmp_path, f"cluster:\n  redis: redis://h:1\n  namespace: '{namespace}'\n")
    if ok:
        load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith(f"{path}:6: cluster.namespace: ")
            and "no ':' in a namespace" in p], info.value.problems


def test_cachegate_check_validates_the_section(tmp_path: Path) -> None:
    bad = write(tmp_path, "cluster:\n  redis: redis://h:1/abc\n  heartbeat: -1\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", bad], capture_output=True, text=True)
    assert r.returncode == 2 and f"{bad}:6: cluster.heartbeat" in r.stderr
    assert f"{bad}:5: cluster.redis: 'redis://h:1/abc': the database 'abc' is not a number" in r.stderr
    good = write(tmp_path, "cluster: {redis: 'rediss://cache.internal:6380/0', node: n1, shared_cache: true}\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", good], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("password", ["Zm9v/YmFyS3CRET", "p?ss-S3CRET", "AB#CDS3CRET", "a@b/S3CRET"])
def test_a_password_with_reserved_characters_is_never_printed_and_check_says_to_encode_it(
        tmp_path: Path, password: str) -> None:
    # '/', '?' and '#' end the netloc for urllib: no '@' was left in it, and nothing was masked.
    path = write(tmp_path, f"cluster: {{redis: 'redis://default:{password}@127.0.0.1:6379/0', node: n1}}\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", path], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "S3CRET" not in r.stdout + r.stderr
    assert f"{path}:4: cluster.redis: 'redis://default:***@127.0.0.1:6379/0' is not a Redis URL" in r.stderr
    assert "percent-encoded (%2F %3F %23 %40 %25)" in r.stderr
    encoded = write(tmp_path, "cluster: {redis: 'redis://default:Zm9v%2FYmFy@127.0.0.1:6379/0', node: n1}\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", encoded], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("key", "value", "ok"), [("timeout", "10s", True), ("timeout", "1h", False),
                                                  ("heartbeat", "10s", True), ("heartbeat", "11s", False)])
def test_the_heartbeat_and_the_timeout_are_at_most_10_s(tmp_path: Path, key: str, value: str, ok: bool) -> None:
    # A node's heartbeat key lives a beat and two timeouts: a node restarted after a crash waits
    # that long for its old key (a timeout of 1h: two hours), and purges count it live meanwhile.
    path = write(tmp_path, f"cluster:\n  redis: redis://h:1\n  {key}: {value}\n")
    if ok:
        load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p in info.value.problems if p.startswith(f"{path}:6: cluster.{key}: ")
            and "must be at most 10s" in p], info.value.problems


def test_an_empty_section_is_a_warning_with_its_file_and_line(tmp_path: Path) -> None:
    # Every key commented out: YAML reads null, no cluster at all; the node ran alone, unsaid.
    path = write(tmp_path, "cluster:\n  # redis: redis://10.0.0.5:6379/0\n  # node: a\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{path}:4: warning: cluster: is empty (are its keys commented out?): this node runs alone" in \
        r.stdout + r.stderr
    assert load_config(path).cluster is None
