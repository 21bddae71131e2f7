"""The container and deploy files: the Dockerfile, compose with Prometheus and Grafana, the
Kubernetes kustomize layout, the systemd unit, the Grafana dashboard and the Prometheus alert
rules. Each file is parsed, what it copies or mounts exists, every cachegate config in them
passes ``cachegate check``, the dashboard asks only for metrics a real scrape exports, and
every alert fires in its incident and stays quiet in steady state (``promtool test rules``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import build_parser, main
from proxy.units import parse_duration, parse_size
from tests.conftest import MakeProxy
from tests.harness import Origin

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MB = 1 << 20


# -- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if line.rstrip().endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copies() -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) of every COPY."""
    out = []
    for word, args in dockerfile():
        if word == "COPY":
            parts = args.split()
            stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
            files = [p for p in parts if not p.startswith("--")]
            out.append((files[:-1], files[-1], stage))
    return out


def test_every_path_the_dockerfile_copies_exists() -> None:
    stages = {args.split()[-1] for word, args in dockerfile() if word == "FROM" and " AS " in args.upper()}
    assert copies(), "the Dockerfile copies nothing?"
    for sources, _dest, stage in copies():
        if stage is not None:
            assert stage in stages, f"COPY --from={stage}: no such build stage"
            continue
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_the_dockerfile_is_multi_stage_slim_and_runs_the_console_script_as_a_user() -> None:
    froms = [args for word, args in dockerfile() if word == "FROM"]
    assert len(froms) >= 2, "a build stage and a run stage"
    assert froms[-1].split()[0].endswith("-slim")
    final = dict(final_stage())
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root user (runAsNonRoot can check it)"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(final["ENTRYPOINT"]) == ["cachegate"] and "cachegate" in scripts
    build_parser().parse_args(exec_form(final["CMD"]))  # a command line cachegate accepts
    assert final["STOPSIGNAL"] == "SIGTERM"
    health = final["HEALTHCHECK"].split(" CMD ", 1)[1]
    health_argv = exec_form(health)
    assert health_argv[:2] == ["cachegate", "health"]
    build_parser().parse_args(health_argv[1:])
    config = yaml.safe_load((DEPLOY / "cachegate.yaml").read_text())
    exposed = {int(p) for p in final["EXPOSE"].split()}
    assert exposed == {int(config["listen"].rsplit(":", 1)[1]), int(config["admin"]["listen"].rsplit(":", 1)[1])}
    assert exec_form(final["VOLUME"]) == [config["cache"]["disk"]["path"]]
    assert "nofile" in (ROOT / "Dockerfile").read_text(), "the open-files limit note"


def image_layout(tmp_path: Path) -> Path:
    """The files the Dockerfile puts under /etc/cachegate, laid out in ``tmp_path``."""
    for sources, dest, stage in copies():
        if stage is not None or not dest.startswith("/etc/cachegate"):
            continue
        target = tmp_path / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        (source,) = sources
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target)
        else:
            shutil.copy(ROOT / source, target)
    return tmp_path / "etc/cachegate/cachegate.yaml"


def test_the_image_config_passes_check_in_the_image_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_layout(tmp_path)
    monkeypatch.delenv("CACHEGATE_ADMIN_TOKEN", raising=False)
    assert main(["check", "--config", str(config)]) == 2, "must refuse an open admin API without a token"
    assert "CACHEGATE_ADMIN_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "s3cret")  # guessable, on a listener anyone may reach
    assert main(["check", "--config", str(config)]) == 2
    assert "admin.token is 6 characters long" in capsys.readouterr().err
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "a-token-of-24-characters")
    # (--no-lookup: its upstream is compose's service name, resolved only inside compose's network)
    assert main(["check", "--strict", "--no-lookup", "--config", str(config)]) == 0


def test_the_image_config_passes_check_from_a_checkout_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scripts/run --config deploy/cachegate.yaml` in a checkout: its rule path, relative to the
    config as in /etc/cachegate, finds the checkout's rules (deploy/rules links to ../rules)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "a-token-of-24-characters")
    assert main(["check", "--config", "deploy/cachegate.yaml"]) == 0, capsys.readouterr().err
    assert (ROOT / "deploy/rules/default.yaml").resolve() == (ROOT / "rules/default.yaml").resolve()


def engine_answers() -> str | None:
    """None when a container engine answers; else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if done.returncode != 0:
        return "no container engine answers (docker info: " + (done.stderr.strip().splitlines() or ["?"])[-1] + ")"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_image_builds_and_answers_healthz(tmp_path: Path) -> None:
    why = engine_answers()
    if why is not None:
        pytest.skip(why)
    tag = f"cachegate-test:{os.getpid()}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=800)
    name = f"cachegate-test-{os.getpid()}"
    try:
        subprocess.run(["docker", "run", "-d", "--name", name, "-e", "CACHEGATE_ADMIN_TOKEN=t", "-p",
                        "127.0.0.1::8081", tag], check=True, capture_output=True, timeout=60)
        for _ in range(60):
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name],
                                   capture_output=True, text=True).stdout.strip()
            if state == "healthy":
                break
            subprocess.run(["sleep", "1"], check=True)
        assert state == "healthy", subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert user != "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


# -- every file, and compose ---------------------------------------------------------------


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        if path.suffix == ".json":
            json.loads(text)
        else:
            assert list(yaml.safe_load_all(text)), path


def test_compose_runs_cachegate_the_origin_prometheus_and_grafana_from_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"origin", "cachegate", "prometheus", "grafana"}
    for name in ("origin", "cachegate"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    build_parser().parse_args(services["origin"]["command"])  # after the image's ENTRYPOINT
    for service in services.values():
        for volume in service.get("volumes", ()):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"
    cachegate = services["cachegate"]
    image_config = yaml.safe_load((DEPLOY / "cachegate.yaml").read_text())
    assert image_config["upstreams"][0]["url"] == "http://origin:9000"
    assert parse_duration(cachegate["stop_grace_period"]) > parse_duration(image_config["shutdown_grace"])
    assert cachegate["ulimits"]["nofile"]["soft"] >= 65536
    assert "CACHEGATE_ADMIN_TOKEN" in cachegate["environment"]

    # Prometheus scrapes the admin API with the token compose hands it as a secret.
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    admin_port = image_config["admin"]["listen"].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"cachegate:{admin_port}"]
    assert job["metrics_path"] == "/metrics"
    (secret,) = services["prometheus"]["secrets"]
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret['target']}"
    assert compose["secrets"][secret["source"]] == {"environment": "CACHEGATE_ADMIN_TOKEN"}

    # Grafana has the Prometheus beside it and the dashboard provisioned.
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cachegate.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/cachegate.json"] == f"{path}/cachegate.json"

    # Prometheus loads the alert rules, mounted beside its config (rule_files are relative to it).
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    config_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    assert prometheus["rule_files"] == ["alerts.yml"]
    for rule_file in prometheus["rule_files"]:
        assert mounts[f"./prometheus/{rule_file}"] == str(config_dir / rule_file)


# -- Kubernetes ----------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"


def k8s_resources() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            assert doc["metadata"]["name"], path
            out[doc["kind"]] = doc
    return out


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert set(k8s_resources()) == {"ConfigMap", "Deployment", "Service"}


def test_kubectl_kustomize_builds_the_layout() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (the layout is checked with PyYAML above)")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    assert all(d["metadata"]["namespace"] == "cachegate" for d in docs)


def k8s_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = k8s_resources()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def k8s_layout(tmp_path: Path) -> Path:
    """The ConfigMap's files where the Deployment mounts them (keys to paths, as items say)."""
    deployment, container = k8s_container()
    data = k8s_resources()["ConfigMap"]["data"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]])
    for item in volumes[mount["name"]]["configMap"]["items"]:
        target = tmp_path / mount["mountPath"].lstrip("/") / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])
    config_arg = container["args"][container["args"].index("--config") + 1]
    return tmp_path / config_arg.lstrip("/")


def test_the_configmap_config_passes_check_where_the_deployment_mounts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "t" * 32)
    config = k8s_layout(tmp_path)
    # No warnings either (--no-lookup: its upstream is a Service's name, resolved only in the cluster).
    assert main(["check", "--strict", "--no-lookup", "--config", str(config)]) == 0


def k8s_quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def test_the_deployment_probes_drains_and_sizes_itself_by_the_config() -> None:
    deployment, container = k8s_container()
    config = yaml.safe_load(k8s_resources()["ConfigMap"]["data"]["cachegate.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == int(config["admin"]["listen"].rsplit(":", 1)[1])
    assert ports["http"] == int(config["listen"].rsplit(":", 1)[1])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}, probe
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + parse_duration(config["shutdown_grace"]) + 5
    build_parser().parse_args(container["args"])
    assert "auto" in container["args"]
    # --workers auto reads the CPU limit: the workers share one memory tier (cache.memory, the
    # machine's) and each needs ~100 MB besides, the supervisor's share included (docs/deploy.md).
    limits = container["resources"]["limits"]
    workers = int(float(limits["cpu"]))
    need = parse_size(config["cache"]["memory"]) + workers * 100 * MB
    assert k8s_quantity(limits["memory"]) >= need
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config["cache"]["disk"]["path"])
    cache = volumes[cache_mount["name"]]
    assert k8s_quantity(cache["emptyDir"]["sizeLimit"]) > parse_size(config["cache"]["disk"]["size"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["admin"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["CACHEGATE_ADMIN_TOKEN"]["valueFrom"]
    service = k8s_resources()["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# -- systemd -------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd/cachegate.service"


def unit() -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_the_systemd_unit_is_hardened_and_runs_cachegate() -> None:
    u = unit()
    service = {k.split(".", 1)[1]: v[-1] for k, v in u.items() if k.startswith("Service.")}
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("Restart", "on-failure"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("KillMode", "mixed")):
        assert service.get(key) == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert "-HUP $MAINPID" in service["ExecReload"]
    # Ready, reloads and the watchdog by sd_notify (proxy.sdnotify), from the supervisor only.
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert parse_duration(service["WatchdogSec"]) >= 30
    start = shlex.split(service["ExecStart"])
    # The virtualenv docs/deploy.md makes (no pip into a PEP 668 system Python), outside
    # /home and /root: ProtectHome=yes hides them from the service.
    assert start[0] == f"{systemd_venv()}/bin/cachegate"
    assert not start[0].startswith(("/home/", "/root/"))
    build_parser().parse_args(start[1:])
    config_path = start[start.index("--config") + 1]
    assert config_path == "/etc/cachegate/cachegate.yaml"
    # The config the unit is made for keeps its cache in the unit's CacheDirectory.
    config = yaml.safe_load((DEPLOY / "cachegate.yaml").read_text())
    assert config["cache"]["disk"]["path"] == f"/var/cache/{service['CacheDirectory']}"
    assert parse_duration(service["TimeoutStopSec"]) > parse_duration(config["shutdown_grace"])
    check = shlex.split(service["ExecStartPre"])
    assert check[0] == start[0]
    assert check[1] == "check" and check[check.index("--config") + 1] == config_path


def systemd_venv() -> str:
    """The virtualenv docs/deploy.md's systemd steps install cachegate into."""
    section = (ROOT / "docs/deploy.md").read_text().split("## systemd", 1)[1]
    made = re.search(r"^(?:/usr/bin/)?python3 -m venv (\S+)", section, re.M)
    assert made, "docs/deploy.md: no python3 -m venv in the systemd steps"
    assert f"{made.group(1)}/bin/pip install ." in section
    return made.group(1)


def systemd_etc_steps() -> list[str]:
    """The lines of docs/deploy.md's systemd steps that place files in /etc/cachegate."""
    section = (ROOT / "docs/deploy.md").read_text().split("## systemd", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if "/etc/cachegate" in line and "systemctl" not in line]


def test_the_systemd_steps_run_again_keep_the_config_rules_and_token_in_etc(tmp_path: Path) -> None:
    """Run as an upgrade, the install steps placed the example config over the operator's, a
    new admin token over the old one, and the rules in /etc/cachegate/rules/rules/: run twice
    here (with /etc/cachegate in a temporary directory), the second run changes nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test installs it with apt-get where it can)")
    etc = tmp_path / "etc" / "cachegate"
    script = "\n".join(line.replace("/etc/cachegate", str(etc)) for line in systemd_etc_steps())
    assert str(etc) in script and "rules" in script and "env" in script

    def run() -> None:
        done = subprocess.run(["sh", "-ec", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    run()
    config, rules, env = etc / "cachegate.yaml", etc / "rules" / "default.yaml", etc / "env"
    assert config.read_text() == (DEPLOY / "cachegate.yaml").read_text()
    assert rules.read_text() == (ROOT / "rules" / "default.yaml").read_text()
    assert re.fullmatch(r"CACHEGATE_ADMIN_TOKEN=[0-9a-f]{32}\n", env.read_text())
    assert env.stat().st_mode & 0o777 == 0o600
    # The operator's own, then the steps again (an upgrade):
    config.write_text(config.read_text() + "# mine\n")
    rules.write_text(rules.read_text() + "# mine\n")
    ours = {path: path.read_text() for path in (config, rules, env)}
    run()
    assert {path: path.read_text() for path in (config, rules, env)} == ours
    assert not (etc / "rules" / "rules").exists()
    assert env.stat().st_mode & 0o777 == 0o600


def test_the_systemd_steps_say_to_set_the_upstreams_and_a_loopback_admin_listener() -> None:
    """The steps copy deploy/cachegate.yaml, written for Docker (admin API on every interface,
    upstream origin:9000), to /etc/cachegate: on a VM that opened the admin API to the
    network unless the steps say to change it before the first start."""
    image = yaml.safe_load((DEPLOY / "cachegate.yaml").read_text())
    assert str(image["admin"]["listen"]).startswith("0.0.0.0:")  # why the step is needed
    section = (ROOT / "docs/deploy.md").read_text().split("## systemd", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    before_start = block.split("systemctl enable", 1)[0]
    assert "upstreams:" in before_start and "admin.listen: 127.0.0.1:" in before_start, block
    assert "`admin.listen:` to\n`127.0.0.1:8081`" in section


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    cachegate = shutil.which("cachegate") or str(Path(os.sys.executable).parent / "cachegate")
    copy = tmp_path / "cachegate.service"
    copy.write_text(UNIT.read_text().replace(f"{systemd_venv()}/bin/cachegate", cachegate))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if str(copy) in line or "cachegate" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


# -- the Grafana dashboard -----------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana/cachegate.json"
METRIC = re.compile(r"\b((?:cachegate|process)_[a-z0-9_]+)\b")
CLUSTER_PREFIX = "cachegate_cluster_"


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            out.append((panel["title"], target["expr"]))
    templating = board["templating"]["list"]
    out.extend((t["name"], t["definition"]) for t in templating if t.get("definition"))
    return out


def exported_names(text: str) -> set[str]:
    """Every sample name a scrape has, or would have once counted (counters, histograms)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


async def test_the_dashboard_asks_only_for_metrics_a_real_scrape_exports(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/a", body=b"a" * 100, headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    await proxy.get("/a")
    await asyncio.sleep(0.05)
    await proxy.get("/a")
    await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/a"]})
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    exported = exported_names(text)
    queries = dashboard_queries()
    assert len(queries) >= 25
    used = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no cachegate metric in {expr}"
        for name in names:
            if name.startswith(CLUSTER_PREFIX):
                continue  # exported in cluster mode only: tests/ops/test_dashboard_cluster.py
            assert name in exported, f"panel {title!r} asks for {name}, which /metrics does not export"
            used.add(name)
    # What the dashboard is for: each of these is graphed.
    for name in ("cachegate_requests_total", "cachegate_upstream_requests_total", "cachegate_response_bytes_total",
                 "cachegate_request_duration_seconds_bucket", "cachegate_upstream_up",
                 "cachegate_upstream_errors_total", "cachegate_evictions_total", "cachegate_purges_total",
                 "cachegate_fills_total", "cachegate_cache_bytes", "cachegate_worker_resident_memory_bytes",
                 "cachegate_disk_writes_pending", "cachegate_responses_total", "cachegate_purge_failures_total",
                 "cachegate_worker_restarts_total", "cachegate_cache_budget_bytes"):
        assert name in used, f"the dashboard does not graph {name}"
    per_node = [expr for _, expr in queries if "by (instance" in expr]
    assert len(per_node) >= 5, "panels per node (Prometheus instance) for clustered setups"


def test_no_dashboard_panel_draws_a_5xx_answer_twice() -> None:
    """A 5xx answer is counted in cachegate_upstream_errors_total{kind="status_5NN"} and in
    cachegate_upstream_requests_total{status_class="5xx"}: "Upstream errors" drew both, each
    5xx once as its status kind and again as "5xx"."""
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        exprs = [target["expr"] for target in panel.get("targets", ())]
        all_errors = any("cachegate_upstream_errors_total" in e and 'kind!~"status_' not in e for e in exprs)
        answers_5xx = any(re.search(r'cachegate_upstream_requests_total\{[^}]*status_class="5xx"', e) for e in exprs)
        assert not (all_errors and answers_5xx), panel["title"]


SELECTOR = re.compile(r"\b(cachegate_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Series in no ratio (proxy/live.py NOT_IN_RATIOS; docs/admin-api.md's PromQL): a PURGE asks
# nothing of the cache's content, and cachegate's own bodies (tier="none") are neither the store's
# nor the origin's.
NOT_IN_RATIOS = {"cachegate_requests_total": ("cache_status", "PURGE"),
                 "cachegate_response_bytes_total": ("tier", "none")}


def selects(matchers: str, label: str, value: str) -> bool:
    """Whether a series with label=value passes every matcher of a selector on that label."""
    for name, op, pattern in MATCHER.findall(matchers):
        if name != label:
            continue
        hit = re.fullmatch(pattern, value) is not None if "~" in op else pattern == value
        if hit == op.startswith("!"):
            return False
    return True


def test_no_dashboard_ratio_counts_purges_or_cachegates_own_bodies() -> None:
    """With 40 PURGE/s and 10 GET/s all hits, "Hit ratio" drew 0.2 where /stats says 1.0: every
    selector of a ratio panel (numerator and denominator) leaves out what /stats leaves out."""
    ratios = [(title, expr) for title, expr in dashboard_queries() if " / " in expr]
    assert len(ratios) >= 5, ratios
    for title, expr in ratios:
        for metric, matchers in SELECTOR.findall(expr):
            if metric in NOT_IN_RATIOS:
                label, value = NOT_IN_RATIOS[metric]
                assert not selects(matchers, label, value), f"panel {title!r} counts {label}={value}: {expr}"
    # the checker itself: a bare selector counts them, the documented ones do not
    assert selects('instance=~"$instance"', "cache_status", "PURGE")
    assert not selects('cache_status!="PURGE"', "cache_status", "PURGE")
    assert not selects('tier=~"memory|disk|upstream"', "tier", "none")


def test_open_files_are_held_against_the_limit_per_process() -> None:
    """process_max_fds is one process's limit; process_open_fds is the sum over the supervisor
    and every worker: drawn against each other, four workers at a quarter of the limit each
    looked like a node at its limit. The busiest process is what runs out."""
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if any("process_max_fds" in t["expr"] for t in p.get("targets", ()))]
    assert panels
    for panel in panels:
        others = [t["expr"] for t in panel["targets"] if "process_max_fds" not in t["expr"]]
        assert others and all(re.match(r"max by \(instance\) \(cachegate_worker_open_fds\{", e) for e in others), \
            (panel["title"], others)


# -- the Prometheus alert rules -------------------------------------------------------------

ALERTS = DEPLOY / "prometheus/alerts.yml"
# promtool's unit tests of them; those needing a day of history are evaluated every 5 minutes
ALERT_TESTS = (DEPLOY / "prometheus/alerts_test.yml", DEPLOY / "prometheus/alerts_test_daily.yml")


def promtool() -> str:
    return shutil.which("promtool") or pytest.skip(
        "promtool is not installed (scripts/test installs Debian's prometheus, which has it, with apt-get where it can)")


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_alert_rules_and_the_prometheus_config_that_loads_them(tmp_path: Path) -> None:
    tool = promtool()
    done = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # prometheus.yml as shipped, beside its rules, with the token file compose's secret would be
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, tmp_path / name)
    (tmp_path / "token").write_text("t" * 32)
    config = tmp_path / "prometheus.yml"
    config.write_text(config.read_text().replace("/run/secrets/cachegate-admin-token", str(tmp_path / "token")))
    done = subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr, done.stdout + done.stderr


def test_every_alert_fires_in_its_incident_and_stays_quiet_in_steady_state() -> None:
    tool = promtool()
    done = subprocess.run([tool, "test", "rules", *map(str, ALERT_TESTS)], capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    # A test of a name no rule has passes vacuously, and an alert no test names is not tested:
    fires, quiet = set(), set()
    for path in ALERT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group["alert_rule_test"]:
                (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "never tested firing"
    assert names - quiet == set(), "never tested quiet"
    assert (fires | quiet) - names == set(), "tests of alerts alerts.yml does not have"


def test_every_alert_says_how_urgent_what_happened_and_the_first_step_in_the_docs() -> None:
    guide = (ROOT / "docs/deploy.md").read_text()
    section = guide.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): line for line in section.splitlines() if (m := re.match(r"\| `(Cachegate\w+)` \|", line))}
    rules = alert_rules()
    assert len(rules) == len({rule["alert"] for rule in rules}), "an alert name twice"
    for rule in rules:
        name, labels, notes = rule["alert"], rule["labels"], rule["annotations"]
        assert labels["severity"] in ("page", "ticket"), name
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert "{{ $labels.instance }}" in notes["summary"], name  # which node, in a cluster
        assert notes["runbook_url"] == "docs/deploy.md#alerts", name
        assert name in rows, f"docs/deploy.md's Alerts section has no row for {name}"
        assert f"| {labels['severity']} |" in rows[name], (name, rows[name])
    assert set(rows) == {rule["alert"] for rule in rules}, "rows for alerts alerts.yml does not have"


def documented_metric_names() -> set[str]:
    """The first column of docs/admin-api.md's table of metrics, and of docs/cluster.md's (cluster
    mode's own, cachegate_cluster_*)."""
    names: set[str] = set()
    for doc, allowed in (("admin-api.md", ("cachegate_", "process_")), ("cluster.md", (CLUSTER_PREFIX,))):
        text = (ROOT / "docs" / doc).read_text()
        for line in text.splitlines():
            if line.startswith("| `"):
                names.update(n for n in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]) if n.startswith(allowed))
    return names


# A selector by name regex (``{__name__=~"cachegate_upstream_(requests|errors)_total"}``, the
# documented way to add two families when one of them may have no series yet).
NAME_PATTERN = re.compile(r'__name__=~"([^"]*)"')


def metric_names(expr: str) -> set[str]:
    """The metric names an expression asks for (the dashboard's panels, the alert rules), those
    of a ``{__name__=~"a_(b|c)_total"}`` selector included."""
    names = set(METRIC.findall(NAME_PATTERN.sub("", expr)))
    for pattern in NAME_PATTERN.findall(expr):
        parts = re.fullmatch(r"([a-z0-9_]*)\(([a-z0-9_|]+)\)([a-z0-9_]*)", pattern)
        assert parts, f"a name pattern this test cannot expand: {pattern}"
        names.update(parts.group(1) + one + parts.group(3) for one in parts.group(2).split("|"))
    return names


def test_every_metric_the_alerts_and_the_dashboard_use_is_documented() -> None:
    documented = documented_metric_names()
    assert {"cachegate_requests_total", "process_max_fds", "cachegate_cluster_connected"} <= documented
    assert metric_names('rate({__name__=~"cachegate_upstream_(requests|errors)_total", kind!="x"}[1m])') == \
        {"cachegate_upstream_requests_total", "cachegate_upstream_errors_total"}
    used = {(f"alert {rule['alert']}", name) for rule in alert_rules() for name in metric_names(rule["expr"])}
    used |= {(f"panel {title!r}", name) for title, expr in dashboard_queries() for name in metric_names(expr)}
    assert len({name for _, name in used}) >= 40
    missing = set()
    for where, name in sorted(used):
        stem = re.sub(r"_(bucket|sum|count)$", "", name)  # a histogram's samples
        if name not in documented and stem not in documented:
            missing.add(f"{where}: {name}")
    assert not missing, "not in docs/admin-api.md's table of metrics:\n" + "\n".join(sorted(missing))


def test_the_readme_config_example_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    example = section.split("```yaml", 1)[1].split("```", 1)[0]
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    (tmp_path / "cachegate.yaml").write_text(example)
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "t" * 32)
    assert main(["check", "--config", str(tmp_path / "cachegate.yaml")]) == 0


def test_scripts_are_executable() -> None:
    for script in ("run", "test", "bench"):
        assert os.access(ROOT / "scripts" / script, os.X_OK), script


def test_every_yaml_config_under_deploy_is_checked_here() -> None:
    configs = {p.name for p in (ROOT / "deploy").glob("*.yaml")}
    assert configs == {"cachegate.yaml", "compose.yaml", "cluster.yaml", "compose.cluster.yaml"}, \
        "a new deploy config needs a check test"
    assert os.access(ROOT / "scripts/run", os.X_OK) and os.access(ROOT / "scripts/test", os.X_OK)


def test_the_cluster_compose_file_runs_two_nodes_of_one_cluster_on_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.cluster.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "origin", "node-a", "node-b"}
    build_parser().parse_args(services["origin"]["command"])
    nodes = [services["node-a"], services["node-b"]]
    assert {n["environment"]["CACHEGATE_NODE"] for n in nodes} == {"a", "b"}
    for node in nodes:
        assert (ROOT / "deploy" / node["build"]["context"] / node["build"]["dockerfile"]).resolve() \
            == ROOT / "Dockerfile"
        args = build_parser().parse_args(node["command"])  # after the image's ENTRYPOINT (cachegate)
        assert args.config == "/etc/cachegate/cluster.yaml"
        assert "./cluster.yaml:/etc/cachegate/cluster.yaml:ro" in node["volumes"]
    assert 'pip install ".[cluster]"' in (ROOT / "Dockerfile").read_text()
    # The node config passes check in the image's layout (its rules beside it).
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    shutil.copy(ROOT / "deploy/cluster.yaml", tmp_path / "cluster.yaml")
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "0123456789abcdef0123")
    monkeypatch.setenv("CACHEGATE_NODE", "a")
    assert main(["check", "--config", str(tmp_path / "cluster.yaml")]) == 0


def test_the_readme_deploy_rows_name_every_step_of_the_deploy_guide() -> None:
    """README's one-row recipes for Kubernetes and systemd leave out no step docs/deploy.md runs
    (a namespace not created: the secret fails; a unit not daemon-reloaded: not found)."""
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.split("## Deploy", 1)[1].splitlines()
            if line.startswith("| ")}
    guide = (ROOT / "docs/deploy.md").read_text()
    for name, must in (("Kubernetes", ("kubectl create namespace cachegate", "kubectl apply -k deploy/kubernetes")),
                       ("systemd", ("/etc/cachegate/cachegate.yaml", "/etc/cachegate/rules", "/etc/cachegate/env",
                                    "install -m 0644 deploy/systemd/cachegate.service /etc/systemd/system/",
                                    "systemctl daemon-reload", "/usr/bin/python3 -m venv /opt/cachegate"))):
        block = guide.split(f"## {name}\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        for step in must:
            assert step in block, (name, step)  # (the guide runs it)
            assert step in rows[name], (name, step)


def test_the_credential_key_path_deploy_md_gives_checks_by_hand_and_under_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``${CREDENTIALS_DIRECTORY:-/etc/ssl/private}/cachegate.key``: the service (systemd sets the
    variable) reads its copy; a ``cachegate check`` by hand (not set) reads the file itself."""
    from tests.harness import self_signed

    guide = (ROOT / "docs/deploy.md").read_text()
    written = re.search(r"`(\$\{CREDENTIALS_DIRECTORY:-/etc/ssl/private\}/cachegate\.key)`", guide)
    assert written, "docs/deploy.md: no ${CREDENTIALS_DIRECTORY:-...} key path"
    key, cert = self_signed(tmp_path, "a", "a.test", "IP:127.0.0.1")
    (tmp_path / "private").mkdir()
    (tmp_path / "credentials").mkdir()
    shutil.copy(key, tmp_path / "private" / "cachegate.key")
    shutil.copy(key, tmp_path / "credentials" / "cachegate.key")
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\nlisten:\n  - 127.0.0.1:0\n"
                      f"  - {{address: 127.0.0.1:0, tls: {{cert: {cert}, key: "
                      f"'{written.group(1).replace('/etc/ssl/private', str(tmp_path / 'private'))}'}}}}\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["check", "--config", str(config)]) == 0, capsys.readouterr().err
    (tmp_path / "private" / "cachegate.key").unlink()  # only systemd's copy now
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    assert main(["check", "--config", str(config)]) == 0, capsys.readouterr().err
