"""Config: one case per validation rule, environment overrides, the annotated example file."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.config import load_config
from processors.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"kafka.partitions": 0}, "kafka.partitions"),
        ({"kafka.rotate_memory_mb": -1}, "kafka.rotate_memory_mb"),
        ({"topics.turns": ""}, "topics.turns"),
        ({"clickhouse.dsn": "mysql://x"}, "clickhouse.dsn"),
        ({"otlp.grpc_port": 70000}, "otlp.grpc_port"),
        ({"otlp.max_request_bytes": 0}, "otlp.max_request_bytes"),
        ({"web.port": -1}, "web.port"),
        ({"llm.judge_rate": 1.5}, "llm.judge_rate"),
        ({"capture.redact": ["passwords"]}, "capture.redact"),
        ({"worker.stall_timeout_s": -1}, "worker.stall_timeout_s"),
        ({"worker.stall_timeout_s": 2}, "worker.stall_timeout_s"),
        ({"worker.start_timeout_s": 30}, "worker.start_timeout_s"),
        ({"assemble.idle_timeout_s": 0}, "assemble.idle_timeout_s"),
        ({"assemble.linger_s": 0}, "assemble.linger_s"),
        ({"understand.embedder": "bert"}, "understand.embedder"),
        ({"understand.answer_wait_s": -1}, "understand.answer_wait_s"),
        ({"diagnose.min_support": 0}, "diagnose.min_support"),
        ({"act.backend": "gitlab"}, "act.backend"),
        ({"review.alpha": 1.0}, "review.alpha"),
    ],
)
def test_each_rule_names_its_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, env={}, overrides=overrides)
    assert e.value.key == key
    assert key in str(e.value)


def test_act_target_outside_repo_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("act:\n  targets:\n    - {path: ../../etc/passwd, kind: prompt}\n")
    with pytest.raises(ConfigError, match=r"act.targets\[0\].path"):
        load_config(f, env={})


def test_unknown_key_and_wrong_type_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("otlp:\n  grpc_prot: 1\n")
    with pytest.raises(ConfigError, match="otlp.grpc_prot.*unknown key"):
        load_config(f, env={})
    f.write_text("otlp:\n  grpc_port: lots\n")
    with pytest.raises(ConfigError, match="otlp.grpc_port.*expected int"):
        load_config(f, env={})


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("otlp:\n  grpc_port: 1000\n  http_port: 1001\nkafka:\n  bootstrap: a:1\n")
    env = {
        "CLOSELOOP_OTLP_GRPC_PORT": "2000",
        "CLOSELOOP_KAFKA": "b:2",
        "CLOSELOOP_CAPTURE_REDACT": "emails,cards",
    }
    cfg = load_config(f, env=env, overrides={"otlp.http_port": 3001})
    assert (cfg.otlp.grpc_port, cfg.otlp.http_port, cfg.kafka.bootstrap) == (2000, 3001, "b:2")
    assert cfg.capture.redact == ["emails", "cards"]


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="CLOSELOOP_OTLP_GRPC"):
        load_config(None, env={"CLOSELOOP_OTLP_GRPC": "1"})


def test_near_misses_get_a_did_you_mean(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("otlp:\n  grpc_prot: 1\n")
    with pytest.raises(ConfigError, match="did you mean grpc_port"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="did you mean CLOSELOOP_OTLP_GRPC_PORT"):
        load_config(None, env={"CLOSELOOP_OTLP_GRPC_PROT": "1"})
    with pytest.raises(ConfigError, match="did you mean CLOSELOOP_KAFKA"):
        load_config(None, env={"CLOSELOOP_KAFAK": "a:1"})
    # nothing close: the known keys are listed instead of a wild guess
    f.write_text("otlp:\n  zzzzzz: 1\n")
    with pytest.raises(ConfigError, match="known keys here: .*grpc_port") as e:
        load_config(f, env={})
    assert "did you mean" not in str(e.value)


def test_tansu_binary_variable_is_a_config_key() -> None:
    """CLOSELOOP_TANSU_BINARY (the embedded broker's executable) is read, not refused."""
    cfg = load_config(None, env={"CLOSELOOP_TANSU_BINARY": "/opt/tansu/bin/tansu"})
    assert cfg.kafka.tansu_binary == "/opt/tansu/bin/tansu"
    assert load_config(None, env={}).kafka.tansu_binary == ""


def test_example_file_holds_every_default() -> None:
    example = load_config(REPO / "closeloop.example.yaml", env={})
    assert example == load_config(None, env={})


def test_default_store_is_embedded_under_home(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path)})
    assert cfg.clickhouse_dsn == f"chdb://{tmp_path.resolve() / 'clickhouse'}"
    assert cfg.embedded_store


def test_a_named_home_brings_its_closeloop_yaml(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "closeloop.yaml").write_text("web:\n  port: 18123\n")
    monkeypatch.chdir(tmp_path)  # no ./closeloop.yaml to fall back on
    assert load_config(None, env={}, overrides={"home": str(home)}).web.port == 18123
    assert load_config(None, env={"CLOSELOOP_HOME": str(home)}).web.port == 18123
    # a file given explicitly wins over the home's
    other = tmp_path / "other.yaml"
    other.write_text("web:\n  port: 18124\n")
    assert load_config(other, env={}, overrides={"home": str(home)}).web.port == 18124
    assert (
        load_config(
            None, env={"CLOSELOOP_CONFIG": str(other), "CLOSELOOP_HOME": str(home)}
        ).web.port
        == 18124
    )
    # the port came from a file: asked for, not a default the stack may move
    assert load_config(None, env={}, overrides={"home": str(home)}).asked_for("web.port")
    assert not load_config(None, env={}, overrides={"home": str(home)}).asked_for("otlp.http_port")


def test_closeloop_yaml_inside_home_is_found_without_config(tmp_path: Path, monkeypatch) -> None:
    from processors.config import config_for

    monkeypatch.delenv("CLOSELOOP_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "h"
    home.mkdir()
    (home / "closeloop.yaml").write_text("web:\n  port: 18123\n")
    assert config_for(None, str(home)).web.port == 18123
    other = tmp_path / "other.yaml"
    other.write_text("web:\n  port: 18124\n")
    assert config_for(str(other), str(home)).web.port == 18124  # --config still wins
    assert config_for(None, str(tmp_path / "empty")).web.port != 18123
