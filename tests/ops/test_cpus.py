"""``--workers auto`` counts the CPUs the process may use: affinity mask and cgroup quota (fake trees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_workers
from proxy.cpus import available_cpus, cgroup_cpu_limit, cgroup_memory_limit, cgroup_oom_kills


def tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def cpus(root: Path, membership: str, affinity: int = 64) -> int:
    (root / "self-cgroup").write_text(membership + "\n")
    return available_cpus(str(root / "fs"), str(root / "self-cgroup"), lambda: affinity)


def test_a_container_limited_to_two_cpus_on_a_64_core_host_starts_two_workers(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {"cpu.max": "200000 100000"})  # cgroup v2, own cgroup namespace: "0::/"
    assert cpus(tmp_path, "0::/") == 2


def test_no_quota_leaves_the_affinity_mask(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {"cpu.max": "max 100000"})
    assert cpus(tmp_path, "0::/", affinity=6) == 6
    assert cpus(tmp_path, "0::/nowhere", affinity=3) == 3  # no such cgroup directory: no limit


def test_the_affinity_mask_wins_when_it_is_smaller(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {"cpu.max": "800000 100000"})
    assert cpus(tmp_path, "0::/", affinity=3) == 3


def test_a_fractional_quota_rounds_down_but_never_to_zero(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {"cpu.max": "250000 100000"})
    assert cpus(tmp_path, "0::/") == 2
    tree(tmp_path / "fs", {"cpu.max": "50000 100000"})
    assert cpus(tmp_path, "0::/") == 1


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {
        "system.slice/cpu.max": "300000 100000",
        "system.slice/cachegate.service/cpu.max": "max 100000",
    })
    assert cpus(tmp_path, "0::/system.slice/cachegate.service") == 3
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) == 3.0


def test_cgroup_v1_quota_and_period(tmp_path: Path) -> None:
    tree(tmp_path / "fs", {"cpu,cpuacct/cpu.cfs_quota_us": "400000",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    # The host's path of the container's cgroup is not visible inside it: the mount is the cgroup.
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc"
    assert cpus(tmp_path, membership) == 4
    tree(tmp_path / "fs", {"cpu,cpuacct/cpu.cfs_quota_us": "-1"})
    assert cpus(tmp_path, membership, affinity=5) == 5


@pytest.mark.parametrize("garbage", ["", "x y", "100000", "-5 100000", "100000 0"])
def test_unreadable_quotas_mean_no_limit(tmp_path: Path, garbage: str) -> None:
    tree(tmp_path / "fs", {"cpu.max": garbage})
    assert cpus(tmp_path, "0::/", affinity=7) == 7


def test_workers_auto_in_the_config_reads_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.cpus

    tree(tmp_path / "fs", {"cpu.max": "100000 100000"})
    (tmp_path / "self-cgroup").write_text("0::/\n")
    monkeypatch.setattr(proxy.cpus, "CGROUP_ROOT", str(tmp_path / "fs"))
    monkeypatch.setattr(proxy.cpus, "PROC_SELF_CGROUP", str(tmp_path / "self-cgroup"))
    monkeypatch.setattr(proxy.cpus, "affinity_cpus", lambda: 64)
    assert parse_workers("auto") == 1


def test_the_memory_limit_of_the_cgroup_and_its_ancestors_v2_and_v1(tmp_path: Path) -> None:
    """For the config's check of cache.memory: the tightest limit, "max" (v2) or a huge number
    (v1) being none."""
    (tmp_path / "self-cgroup").write_text("0::/system.slice/cachegate.service\n")
    tree(tmp_path / "fs", {"memory.max": "max", "system.slice/memory.max": "1073741824",
                           "system.slice/cachegate.service/memory.max": "max"})
    assert cgroup_memory_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) == 1 << 30
    tree(tmp_path / "fs", {"system.slice/memory.max": "max"})
    assert cgroup_memory_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) is None
    (tmp_path / "self-cgroup").write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    tree(tmp_path / "fs", {"memory/memory.limit_in_bytes": "536870912"})  # the mount is the cgroup
    assert cgroup_memory_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) == 512 << 20
    tree(tmp_path / "fs", {"memory/memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_memory_limit(str(tmp_path / "fs"), str(tmp_path / "self-cgroup")) is None


def test_the_oom_kill_counter_is_read_from_the_process_own_cgroup_v2_or_v1(tmp_path: Path) -> None:
    """What the supervisor reads when a worker dies by a signal (``proxy.oom``); this machine's
    real counter is tested in test_oom_kill (v1 or v2, whichever it has)."""
    tree(tmp_path / "v2", {"app/memory.events": "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0"})
    (tmp_path / "self-v2").write_text("0::/app\n")
    assert cgroup_oom_kills(str(tmp_path / "v2"), str(tmp_path / "self-v2")) == 2
    tree(tmp_path / "v1", {"memory/docker/c/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 5",
                           "memory.events": "oom_kill 9"})  # (a hybrid host's empty v2 root: not read)
    (tmp_path / "self-v1").write_text("4:memory:/docker/c\n0::/\n")
    assert cgroup_oom_kills(str(tmp_path / "v1"), str(tmp_path / "self-v1")) == 5
    (tmp_path / "self-none").write_text("4:cpu:/x\n")
    assert cgroup_oom_kills(str(tmp_path / "v1"), str(tmp_path / "self-none")) is None
