"""The container and deploy files: what the Dockerfile copies exists, and the configs are valid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_copies() -> list[tuple[list[str], str]]:
    copies = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0].upper() == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            copies.append((args[:-1], args[-1]))
    return copies


def test_every_path_the_dockerfile_copies_exists() -> None:
    copies = dockerfile_copies()
    assert copies, "the Dockerfile copies nothing?"
    for sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_the_dockerfile_runs_as_a_non_root_user_with_a_cache_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER cachegate" in text
    assert 'VOLUME ["/var/cache/cachegate"]' in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD"))
    assert "/etc/cachegate/cachegate.yaml" in cmd
    args = yaml.safe_load(cmd.removeprefix("CMD").strip())
    build_parser().parse_args(args[1:])  # the command line is one cachegate accepts


def test_the_image_config_passes_check_in_the_image_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lay out the files where the Dockerfile puts them, then run `cachegate check` on them."""
    for sources, dest in dockerfile_copies():
        if not dest.startswith("/etc/cachegate"):
            continue
        target = tmp_path / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        (source,) = sources
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target)
        else:
            shutil.copy(ROOT / source, target)
    config = tmp_path / "etc/cachegate/cachegate.yaml"
    monkeypatch.delenv("CACHEGATE_ADMIN_TOKEN", raising=False)
    assert main(["check", "--config", str(config)]) == 2, "must refuse an open admin API without a token"
    assert "CACHEGATE_ADMIN_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "s3cret")  # guessable, on a listener anyone may reach
    assert main(["check", "--config", str(config)]) == 2
    assert "admin.token is 6 characters long" in capsys.readouterr().err
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "a-token-of-24-characters")
    assert main(["check", "--strict", "--config", str(config)]) == 0


def test_the_compose_file_builds_this_checkout_and_runs_cachegate_commands() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"origin", "cachegate"}
    for service in services.values():
        build = service["build"]
        assert (ROOT / "deploy" / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    origin_cmd = services["origin"]["command"]
    assert origin_cmd[0] == "cachegate"
    build_parser().parse_args(origin_cmd[1:])
    assert services["cachegate"]["depends_on"] == ["origin"]
    image_config = yaml.safe_load((ROOT / "deploy/cachegate.yaml").read_text())
    assert image_config["upstreams"][0]["url"] == "http://origin:9000"


def test_every_yaml_config_under_deploy_is_checked_here() -> None:
    configs = {p.name for p in (ROOT / "deploy").glob("*.yaml")}
    assert configs == {"cachegate.yaml", "compose.yaml"}, "a new deploy config needs a check test"
    assert os.access(ROOT / "scripts/run", os.X_OK) and os.access(ROOT / "scripts/test", os.X_OK)


def test_the_readme_config_example_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    example = section.split("```yaml", 1)[1].split("```", 1)[0]
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    (tmp_path / "cachegate.yaml").write_text(example)
    monkeypatch.setenv("CACHEGATE_ADMIN_TOKEN", "t")
    assert main(["check", "--config", str(tmp_path / "cachegate.yaml")]) == 0
