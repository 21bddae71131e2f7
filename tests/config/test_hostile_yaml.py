"""YAML that is malformed or hostile is refused as ``FILE:LINE: message``, never a traceback.

``cachegate check`` exits 2 and a reload (the same ``load_config``) raises ConfigError, so the
running config stays; this holds for the config file and for the rule files it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import load_config
from proxy.errors import ConfigError

HEAD = b"upstreams: [http://127.0.0.1:9]\n"

# (the rest of the config file, the line the message names, words it must contain)
CASES = [
    (b"? [a, b]\n: 1\n", 2, "a key must be a scalar"),
    (b"? {a: 1}\n: 1\n", 2, "a key must be a scalar"),
    (b"x: &a [*a]\n", 2, "anchors and aliases"),
    (b"x: &a 1\ny: *a\n", 2, "anchors and aliases"),
    (b"base: &b {ttl: 1}\nother:\n  <<: *b\n", 2, "anchors and aliases"),
    (b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", 2, "nested too deeply"),
    (b"\n\nvia: \"caf\xe9\"\n", 4, "not UTF-8 text: byte 0xe9"),
    (b"\n\nvia: \"a\x01b\"\n", 4, "character U+0001 is not allowed"),
    # Plain scalars YAML resolves to values Python will not build.
    (b"workers: " + b"9" * 5000 + b"\n", 2, "an integer of 5000 characters is too long"),
    (b"cache: {memory: " + b"9" * 5000 + b"}\n", 2, "an integer of 5000 characters is too long"),
    (b"? " + b"1" * 5000 + b"\n: x\n", 2, "an integer of 5000 characters is too long"),  # a key
    (b"via: 2024-13-45\n", 2, "cannot read '2024-13-45' as a timestamp"),
]


@pytest.mark.parametrize(("body", "line", "words"), CASES)
def test_check_refuses_hostile_yaml_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                body: bytes, line: int, words: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(HEAD + body)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (message,) = err.splitlines()
    assert message.startswith(f"{config}:{line}: ") and words in message
    with pytest.raises(ConfigError) as caught:  # what a reload sees
        load_config(str(config))
    assert any(p.startswith(f"{config}:{line}: ") for p in caught.value.problems)


def test_a_rule_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_bytes(b"rules:\n  - name: \"caf\xe9\"\n    ttl: 5m\n")
    config = tmp_path / "c.yaml"
    config.write_bytes(HEAD + b"rules: [r.yaml]\n")
    assert main(["check", "--config", str(config)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert message.startswith(f"{tmp_path / 'r.yaml'}:2: not UTF-8 text")


@pytest.mark.parametrize("regex", ["a{4294967296}", "x(?:a{99999999999999999999})", "((((" ])
def test_a_regex_that_does_not_compile_is_named_with_its_rule_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], regex: str) -> None:
    """Whatever compiling a rule's regex raises (re.error, and OverflowError for a repetition
    over 2^32) is that rule's ``FILE:LINE``, not a traceback, and not the config file's line 0
    on a reload."""
    rules = tmp_path / "r.yaml"
    rules.write_text(f"rules:\n  - name: a\n    match: {{path: 'regex:{regex}'}}\n    no_store: true\n"
                     f"  - name: b\n    match: {{header: {{X-A: {{regex: '{regex}'}}}}}}\n    no_store: true\n")
    config = tmp_path / "c.yaml"
    config.write_bytes(HEAD + b"rules: [r.yaml]\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line.split(": bad regex")[0] for line in err.splitlines()] == [
        f"{rules}:3: rules[0].match.path", f"{rules}:6: rules[1].match.header.X-A"]
    with pytest.raises(ConfigError) as caught:  # what a reload sees
        load_config(str(config))
    assert [p.split(":")[1] for p in caught.value.problems] == ["3", "6"]


def test_an_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Eight levels of ten aliases: 200 bytes that expanded to 10^8 values (gigabytes, a minute);
    refused at the first anchor, before anything is expanded."""
    lines = [b"l0: &l0 [x,x,x,x,x,x,x,x,x,x]"]
    lines += [b"l%d: &l%d [%s]" % (n, n, b",".join([b"*l%d" % (n - 1)] * 10)) for n in range(1, 8)]
    config = tmp_path / "c.yaml"
    config.write_bytes(HEAD + b"\n".join(lines) + b"\n")
    assert main(["check", "--config", str(config)]) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert message.startswith(f"{config}:2: anchors and aliases")
