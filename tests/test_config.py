"""Configuration: both accepted forms, every problem reported with its key path, never a crash."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsleep.config import (
    Config,
    ConfigError,
    ModelConfig,
    PolicySource,
    RouterConfig,
    SleepPolicy,
    load_config,
    parse_config,
    summary,
)
from kvsleep.core.scaling import ScalingPolicy

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
EXAMPLE = ROOT / "example-config.yaml"
KVCACHED = DATA / "kvcached-config.yaml"


def minimal(**model: Any) -> dict[str, Any]:
    """A canonical document with one vLLM model, plus whatever keys the test adds to it."""
    return {"models": [{"name": "m", "engine": "vllm", "url": "http://127.0.0.1:8001", **model}]}


def instance(engine_args: Any) -> dict[str, Any]:
    return {"instances": [{"model": "m", "engine": "vllm", "engine_args": engine_args}]}


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "cfg.yaml")
    return caught.value.problems


# --- The shipped files ------------------------------------------------------------------------


def test_example_config_loads_without_problems() -> None:
    config = load_config(str(EXAMPLE))
    assert [(m.name, m.served_name, m.replica, m.engine) for m in config.models] == [
        ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "0", "vllm"),
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "0", "sglang"),
        ("org/chat-8B@0", "org/chat-8B", "0", "vllm"),
        ("org/chat-8B@1", "org/chat-8B", "1", "vllm"),
        ("org/chat-8B@2", "org/chat-8B", "2", "vllm"),
    ]
    llama, qwen, *chat = config.models
    assert {m.scaling for m in chat} == {ScalingPolicy(max_awake=3)}
    assert [(m.url, m.gpus, m.memory_gb, m.affinity) for m in chat] == [
        (f"http://127.0.0.1:800{i + 1}", (i + 1,), 20, "user") for i in range(3)
    ]
    assert llama.policy.idle_threshold_seconds == 120
    assert llama.launched and not qwen.launched
    assert qwen.weights_path == "Qwen/Qwen3-0.6B"
    assert config.gpus[0].memory_gb == 80
    assert qwen.policy.wake_timeout_seconds == 120
    assert summary(config) == (
        "OK: 3 models (2 vllm, 1 sglang), 5 engines, router on 127.0.0.1:8080, auto sleep off"
    )


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    documented = {
        *(f.name for f in dataclasses.fields(RouterConfig) if f.name != "admin_token"),
        *(f.name for f in dataclasses.fields(SleepPolicy)),
        *(f.name for f in dataclasses.fields(PolicySource)),
        *(f.name for f in dataclasses.fields(ModelConfig)),
        *(f.name for f in dataclasses.fields(Config)),
        *(f.name for f in dataclasses.fields(ScalingPolicy)),
        "replicas",
    }
    # Not keys of the canonical form: derived (policy, source, warnings, a replica's model and
    # index) or kvcached-only.
    documented -= {"policy", "engine_args", "venv_path", "source", "warnings", "model", "replica"}
    missing = sorted(key for key in documented if f"{key}:" not in text)
    assert missing == []


def test_kvcached_form_is_accepted_unchanged() -> None:
    config = load_config(str(KVCACHED))
    assert config.router.host == "localhost"
    assert config.router.port == 8080
    assert config.sleep_manager == SleepPolicy()
    llama, qwen = config.models
    assert (llama.name, llama.engine, llama.host, llama.port) == (
        "meta-llama/Llama-3.2-1B",
        "vllm",
        "localhost",
        12346,
    )
    assert (qwen.name, qwen.engine, qwen.host, qwen.port) == (
        "Qwen/Qwen3-0.6B",
        "sglang",
        "localhost",
        30000,
    )
    assert llama.engine_args == (
        "--host=localhost",
        "--port=12346",
        "--gpu-memory-utilization",
        "0.5",
        "--enable-sleep-mode",
    )
    assert llama.env == {
        "KVCACHED_GPU_UTILIZATION": "0.95",
        "KVCACHED_LOG_LEVEL": "INFO",
        "ENABLE_KVCACHED": "true",
        "KVCACHED_AUTOPATCH": "1",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    assert qwen.env == {"KVCACHED_GPU_UTILIZATION": "0.95", "KVCACHED_LOG_LEVEL": "INFO"}
    assert llama.venv_path == str(ROOT / "tests/engine_integration/vllm-v0.9.2/.venv")
    assert qwen.venv_path is None
    assert llama.launched and qwen.launched
    assert all(model.policy == SleepPolicy() for model in config.models)
    assert qwen.weights_path == "Qwen/Qwen3-0.6B"


def test_five_mistakes_are_reported_together() -> None:
    path = str(DATA / "five-mistakes.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: sleep_manager.idle_treshold_seconds: unknown key 'idle_treshold_seconds'"
        " (did you mean 'idle_threshold_seconds'?)",
        f"{path}: sleep_manager.min_sleep_duration: must be >= 0, got -5",
        f"{path}: models[1].engine: unknown engine 'tgi' (expected one of: vllm, sglang)",
        f"{path}: models[2].name: duplicate model name 'meta-llama/Llama-3.2-1B' (also models[0])",
        f"{path}: models[2].url: http://localhost:12346 is the same host:port as models[0]",
    ]


# --- Defaults, overrides, lookups -------------------------------------------------------------


def test_defaults_follow_the_seed() -> None:
    config = parse_config(minimal())
    policy = config.sleep_manager
    assert policy.idle_threshold_seconds == 300
    assert policy.check_interval_seconds == 60
    assert policy.auto_sleep_enabled is False
    assert policy.wakeup_on_request is True
    assert policy.min_sleep_duration == 80
    assert config.router == RouterConfig()
    assert config.models[0].policy == policy


def test_per_model_override_merges_over_sleep_manager() -> None:
    data = {
        "sleep_manager": {"check_interval_seconds": 30, "auto_sleep_enabled": True},
        "models": [
            {
                "name": "a",
                "engine": "vllm",
                "url": "http://127.0.0.1:8001",
                "idle_threshold_seconds": 120,
                "max_held_requests": 5,
            },
            {"name": "b", "engine": "sglang", "url": "http://127.0.0.1:8002"},
        ],
    }
    config = parse_config(data)
    a, b = config.models
    assert a.policy == SleepPolicy(
        idle_threshold_seconds=120,
        check_interval_seconds=30,
        auto_sleep_enabled=True,
        max_held_requests=5,
    )
    assert b.policy == config.sleep_manager
    assert b.policy.idle_threshold_seconds == 300


def test_every_policy_key_is_accepted_globally_and_per_model() -> None:
    def changed(default: object) -> object:
        if isinstance(default, bool):
            return not default
        if isinstance(default, str):  # idle_policy
            return "adaptive" if default == "fixed" else "fixed"
        return default + 1

    values = {f.name: changed(f.default) for f in dataclasses.fields(SleepPolicy)}
    data = minimal(**values)
    data["sleep_manager"] = values
    config = parse_config(data)
    assert config.sleep_manager == SleepPolicy(**values)
    assert config.models[0].policy == SleepPolicy(**values)


def test_lookup_and_address_properties() -> None:
    config = parse_config(
        {
            "models": [
                {"name": "a", "engine": "vllm", "url": "http://LocalHost:9000/"},
                {"name": "b", "engine": "sglang", "url": "https://gpu-box"},
                {"name": "c", "engine": "vllm", "url": "http://[::1]:9001"},
            ]
        }
    )
    a, b, c = config.models
    assert config.model("b") is b
    assert config.model("nope") is None
    assert (a.url, a.host, a.port) == ("http://LocalHost:9000", "localhost", 9000)
    assert (b.host, b.port) == ("gpu-box", 443)
    assert (c.host, c.port) == ("::1", 9001)


def test_command_string_is_split_and_env_values_stringified() -> None:
    model = parse_config(
        minimal(command="vllm serve 'my model' --port 8001", env={"A": 1, "B": True, "C": "x"})
    ).models[0]
    assert model.command == ("vllm", "serve", "my model", "--port", "8001")
    assert model.env == {"A": "1", "B": "true", "C": "x"}
    assert model.launched


# --- kvcached form: where an instance listens -------------------------------------------------


@pytest.mark.parametrize(
    "engine_args",
    [
        ["--port=12347"],
        ["--port 12347"],
        ["--port", "12347"],
        ["--port", 12347],
        "--enable-sleep-mode --port 12347",
        ["--gpu-memory-utilization 0.5", "--port", "12347", "--enable-sleep-mode"],
    ],
)
def test_every_port_spelling(engine_args: Any) -> None:
    model = parse_config(instance(engine_args)).models[0]
    assert (model.url, model.host, model.port) == ("http://127.0.0.1:12347", "127.0.0.1", 12347)
    assert "12347" in model.engine_args or "--port=12347" in model.engine_args


@pytest.mark.parametrize(
    ("host_args", "url"),
    [
        (["--host=localhost"], "http://localhost:12347"),
        (["--host", "10.0.0.5"], "http://10.0.0.5:12347"),
        (["--host 0.0.0.0"], "http://127.0.0.1:12347"),
        (["--host=::"], "http://[::1]:12347"),
    ],
)
def test_instance_host(host_args: list[str], url: str) -> None:
    assert parse_config(instance([*host_args, "--port=12347"])).models[0].url == url


@pytest.mark.parametrize(
    ("engine_args", "message"),
    [
        (["--host=localhost"], "no --port given"),
        (["--port"], "--port has no value"),
        (["--port=http"], "--port 'http' is not a port number (1-65535)"),
        (["--port=70000"], "--port '70000' is not a port number (1-65535)"),
        (["--port=²"], "--port '²' is not a port number (1-65535)"),
        (["--port 'unbalanced"], "cannot split"),
    ],
)
def test_instance_without_a_usable_port(engine_args: list[str], message: str) -> None:
    (problem,) = problems_of(instance(engine_args))
    assert problem.startswith("cfg.yaml: instances[0].engine_args")
    assert message in problem


def test_instance_needs_engine_args_and_venv_path() -> None:
    data = {"instances": [{"model": "m", "engine": "sglang", "using_venv": True}]}
    assert problems_of(data) == [
        "cfg.yaml: instances[0].venv_path: required when using_venv is true",
        "cfg.yaml: instances[0].engine_args: missing required key 'engine_args'"
        " (its --port says where the engine listens)",
    ]


def test_instance_seed_spellings() -> None:
    """The seed also takes `args`, engine `sgl`, and ignores venv_path without using_venv."""
    data = {
        "instances": [
            {"model": "q", "engine": "SGL", "venv_path": "/venv", "args": "--port 30000"},
        ]
    }
    model = parse_config(data).models[0]
    assert (model.engine, model.port, model.venv_path) == ("sglang", 30000, None)


# --- Problems ---------------------------------------------------------------------------------


def test_wrong_types_say_expected_and_got() -> None:
    data = minimal(always_on="yes")
    data["sleep_manager"] = {"idle_threshold_seconds": "5m", "auto_sleep_enabled": 1}
    data["router"] = {"port": True, "max_body_bytes": 0}
    assert problems_of(data) == [
        "cfg.yaml: router.port: expected an integer, got boolean true",
        "cfg.yaml: router.max_body_bytes: must be >= 1, got integer 0",
        "cfg.yaml: sleep_manager.idle_threshold_seconds: expected a number of seconds,"
        " got string '5m'",
        "cfg.yaml: sleep_manager.auto_sleep_enabled: expected true or false, got integer 1",
        "cfg.yaml: models[0].always_on: expected true or false, got string 'yes'",
    ]


def test_durations_and_ports_are_bounded() -> None:
    data = minimal(ready_timeout_seconds=0, wake_eta_seconds=-1)
    data["sleep_manager"] = {"check_interval_seconds": 0, "idle_threshold_seconds": 0}
    data["router"] = {"port": 65536}
    assert problems_of(data) == [
        "cfg.yaml: router.port: must be between 1 and 65535, got integer 65536",
        "cfg.yaml: sleep_manager.check_interval_seconds: must be > 0, got 0",
        "cfg.yaml: models[0].ready_timeout_seconds: must be > 0, got 0",
        "cfg.yaml: models[0].wake_eta_seconds: must be >= 0, got -1",
    ]


def test_close_match_suggestions_at_every_level() -> None:
    data = minimal(enigne="vllm")
    data["sleep_manger"] = {}
    data["router"] = {"prot": 1, "completely_unrelated": 2}
    assert problems_of(data) == [
        "cfg.yaml: sleep_manger: unknown key 'sleep_manger' (did you mean 'sleep_manager'?)",
        "cfg.yaml: router.prot: unknown key 'prot' (did you mean 'port'?)",
        "cfg.yaml: router.completely_unrelated: unknown key 'completely_unrelated'",
        "cfg.yaml: models[0].enigne: unknown key 'enigne' (did you mean 'engine'?)",
    ]


def test_missing_required_keys_and_bad_urls() -> None:
    data = {
        "models": [
            {"engine": "vllm"},
            {"name": "b", "engine": "vllm", "url": "127.0.0.1:8000"},
            {"name": "c", "engine": "vllm", "url": "http://127.0.0.1:8000/v1"},
            {"name": "d", "engine": "vllm", "url": "http://127.0.0.1:99999"},
        ]
    }
    problems = problems_of(data)
    assert problems[:2] == [
        "cfg.yaml: models[0].name: missing required key 'name'",
        "cfg.yaml: models[0].url: missing required key 'url'",
    ]
    assert problems[2].startswith("cfg.yaml: models[1].url: bad URL '127.0.0.1:8000'")
    assert problems[3].startswith("cfg.yaml: models[2].url: bad URL")
    assert problems[4].startswith("cfg.yaml: models[3].url: bad URL")
    assert len(problems) == 5


def test_same_port_on_loopback_and_router_clash() -> None:
    data = {
        "router": {"port": 9000},
        "models": [
            {"name": "a", "engine": "vllm", "url": "http://127.0.0.1:8001"},
            {"name": "b", "engine": "vllm", "url": "http://localhost:8001"},
            {"name": "c", "engine": "vllm", "url": "http://other-host:8001"},
            {"name": "d", "engine": "vllm", "url": "http://localhost:9000"},
        ],
    }
    assert problems_of(data) == [
        "cfg.yaml: models[1].url: http://localhost:8001 is the same host:port as models[0]",
        "cfg.yaml: models[3].url: http://localhost:9000 is the router's own address",
    ]


def test_duplicate_instances_are_reported_at_their_keys() -> None:
    data = {
        "instances": [
            {"model": "m", "engine": "vllm", "engine_args": ["--port=8001"]},
            {"model": "m", "engine": "vllm", "engine_args": ["--port", "8001"]},
        ]
    }
    assert problems_of(data) == [
        "cfg.yaml: instances[1].model: duplicate model name 'm' (also instances[0])",
        "cfg.yaml: instances[1].engine_args: http://127.0.0.1:8001 is the same host:port"
        " as instances[0]",
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "cfg.yaml: (top level): the document is empty; expected a mapping of settings"),
        (
            ["models"],
            "cfg.yaml: (top level): expected a mapping of settings at the top level, got a list",
        ),
        ({}, "cfg.yaml: models: no models configured"),
        ({"models": []}, "cfg.yaml: models: no models configured"),
        ({"instances": None}, "cfg.yaml: instances: no models configured"),
        ({"models": "m"}, "cfg.yaml: models: expected a list of models, got string 'm'"),
    ],
)
def test_document_shape(data: object, problem: str) -> None:
    assert problems_of(data) == [problem]


def test_both_forms_at_once_is_an_error() -> None:
    data = {**minimal(), **instance(["--port=8002"])}
    assert problems_of(data) == [
        "cfg.yaml: models: give either models (canonical form) or instances (kvcached form),"
        " not both"
    ]


def test_engine_specific_and_cross_section_rules() -> None:
    data = {
        "gpus": [{"id": 0, "memory_gb": 80}, {"id": 0, "memory_gb": 40}],
        "policy_source": {"type": "prometheus"},
        "kvcached": {"x": 1},
        "models": [
            {"name": "q", "engine": "sglang", "url": "http://h:1", "sleep_level": 2},
            {"name": "v", "engine": "vllm", "url": "http://h:2", "sleep_level": 3, "gpus": [0, 1]},
        ],
    }
    assert problems_of(data) == [
        "cfg.yaml: kvcached: sets env vars for kvcached-form instances; with models,"
        " use models[].env",
        "cfg.yaml: gpus[1].id: GPU 0 is listed twice",
        "cfg.yaml: models[0].sleep_level: sleep levels are a vLLM feature; SGLang always"
        " releases all memory (leave it out)",
        "cfg.yaml: models[1].sleep_level: must be 0, 1 or 2, got integer 3",
        "cfg.yaml: models[1].gpus[1]: GPU 1 is not in the gpus section",
        "cfg.yaml: policy_source.url: required when type is prometheus",
    ]


def test_prometheus_policy_source() -> None:
    data = minimal()
    data["policy_source"] = {"type": "prometheus", "url": "http://prom:9090/prometheus"}
    assert parse_config(data).policy_source.url == "http://prom:9090/prometheus"
    data["policy_source"] = {"type": "prometheus", "url": "ftp://prom"}
    (problem,) = problems_of(data)
    assert problem.startswith("cfg.yaml: policy_source.url: bad URL 'ftp://prom'")


# --- Admin token ------------------------------------------------------------------------------


def test_admin_token_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSLEEP_ADMIN_TOKEN", "s3cret-token")
    data = minimal()
    data["router"] = {"admin_token_env": "KVSLEEP_ADMIN_TOKEN"}
    config = parse_config(data)
    assert config.router.admin_token == "s3cret-token"
    assert "s3cret-token" not in repr(config)


@pytest.mark.parametrize(("value", "state"), [(None, "not set"), ("", "empty")])
def test_admin_token_env_must_be_set(
    monkeypatch: pytest.MonkeyPatch, value: str | None, state: str
) -> None:
    if value is None:
        monkeypatch.delenv("KVSLEEP_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("KVSLEEP_ADMIN_TOKEN", value)
    data = minimal()
    data["router"] = {"admin_token_env": "KVSLEEP_ADMIN_TOKEN"}
    assert problems_of(data) == [
        f"cfg.yaml: router.admin_token_env: environment variable KVSLEEP_ADMIN_TOKEN is {state}"
    ]


# --- Files ------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("router:\n  port: 8080\n  host: [unclosed\nmodels: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: line 4, column 7: YAML syntax error:")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [f"{path}: cannot read the file: No such file or directory"]


def test_duplicate_yaml_keys_are_problems(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "base: &base {engine: vllm}\n"
        "models:\n"
        "  - <<: *base\n"
        "    name: m\n"
        "    url: http://127.0.0.1:1\n"
        "    url: http://127.0.0.1:2\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [
        f"{path}: line 6: duplicate key 'url' (the later value would silently win)",
        f"{path}: base: unknown key 'base'",
    ]


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    document = minimal(log_file="logs/m.log")
    document["state_dir"] = "state"
    path = tmp_path / "conf" / "kvsleep.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(document))

    assert parse_config(document).state_dir == "state"
    config = load_config(str(path))
    assert config.state_dir == str(tmp_path / "conf" / "state")
    assert config.log_dir == str(tmp_path / "conf" / ".kvsleep-logs")
    assert config.models[0].log_file == str(tmp_path / "conf" / "logs" / "m.log")
    assert config.source == str(path)


# --- Summary ----------------------------------------------------------------------------------


def test_summary_line() -> None:
    data = {
        "models": [
            {"name": "a", "engine": "vllm", "url": "http://127.0.0.1:8001"},
            {"name": "b", "engine": "sglang", "url": "http://127.0.0.1:8002"},
        ]
    }
    assert (
        summary(parse_config(data))
        == "OK: 2 models (1 vllm, 1 sglang), router on 127.0.0.1:8080, auto sleep off"
    )
    data["models"][0]["auto_sleep_enabled"] = True
    assert summary(parse_config(data)).endswith("auto sleep on for 1 of 2 models")
    data["sleep_manager"] = {"auto_sleep_enabled": True}
    assert summary(parse_config(data)).endswith("auto sleep on")
    assert summary(parse_config(minimal())).startswith("OK: 1 model (1 vllm),")


# --- Never anything but Config or ConfigError -------------------------------------------------

KEYS = sorted(
    {
        *minimal()["models"][0],
        *(f.name for f in dataclasses.fields(SleepPolicy)),
        *(f.name for f in dataclasses.fields(RouterConfig)),
        "router",
        "sleep_manager",
        "models",
        "instances",
        "gpus",
        "id",
        "memory_gb",
        "policy_source",
        "type",
        "kvcached",
        "model",
        "engine_args",
        "engine_env",
        "kvcached_env",
        "using_venv",
        "venv_path",
        "command",
        "env",
        "sleep_level",
        "router_port",
    }
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["vllm", "sglang", "http://127.0.0.1:8000", "--port=1", "prometheus"])
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


def check_never_crashes(data: object) -> None:
    try:
        result = parse_config(data, "fuzz.yaml")
    except ConfigError as error:
        assert error.problems
        assert all(problem.startswith("fuzz.yaml: ") for problem in error.problems)
    else:
        assert isinstance(result, Config)
        summary(result)


@settings(max_examples=300, deadline=None)
@given(DOCUMENTS)
def test_arbitrary_documents_give_config_or_config_error(data: object) -> None:
    check_never_crashes(data)


def valid_documents() -> list[dict[str, Any]]:
    return [
        yaml.safe_load(EXAMPLE.read_text()),
        yaml.safe_load(KVCACHED.read_text()),
    ]


def leaf_paths(node: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return [prefix]
    return [prefix, *(p for key, value in items for p in leaf_paths(value, (*prefix, key)))]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_documents_give_config_or_config_error(data: st.DataObject) -> None:
    document = copy.deepcopy(data.draw(st.sampled_from(valid_documents())))
    path = data.draw(st.sampled_from(leaf_paths(document)[1:]))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(DOCUMENTS)
    check_never_crashes(document)


def test_a_duplicate_name_is_reported_with_the_other_problems_of_its_entries() -> None:
    """Reported on the raw entries, so fixing one problem never reveals another."""
    data = {
        "models": [
            {"name": "m", "engine": "vllm", "url": "http://127.0.0.1:8001"},
            {"name": "m", "engine": "vlm", "url": "ftp://127.0.0.1:8002"},
        ]
    }
    problems = problems_of(data)
    assert "cfg.yaml: models[1].name: duplicate model name 'm' (also models[0])" in problems
    assert any(p.startswith("cfg.yaml: models[1].engine: ") for p in problems)
    assert any(p.startswith("cfg.yaml: models[1].url: ") for p in problems)


def test_a_missing_admin_token_only_warns_where_the_config_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KVSLEEP_ADMIN_TOKEN", raising=False)
    data = minimal()
    data["router"] = {"admin_token_env": "KVSLEEP_ADMIN_TOKEN"}
    config = parse_config(data, "cfg.yaml", secrets=False)
    assert config.router.admin_token is None
    assert config.warnings == (
        "cfg.yaml: router.admin_token_env: environment variable KVSLEEP_ADMIN_TOKEN is not set "
        "(needed by kvsleep serve)",
    )
    assert parse_config(minimal(), "cfg.yaml", secrets=False).warnings == ()


# --- Replicas and scaling -----------------------------------------------------------------------


def replicated(**model: Any) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "m",
                "engine": "vllm",
                "replicas": [{"url": f"http://127.0.0.1:800{i}"} for i in range(3)],
                **model,
            }
        ]
    }


def test_a_model_with_replicas_is_one_engine_per_replica_sharing_its_keys() -> None:
    config = parse_config(
        replicated(
            idle_threshold_seconds=30,
            sleep_level=2,
            scaling={"min_awake": 1, "target_in_flight": 4},
            affinity="header:X-Session-Id",
        ),
        "cfg.yaml",
    )
    assert [(m.name, m.served_name, m.replica) for m in config.models] == [
        (f"m@{i}", "m", str(i)) for i in range(3)
    ]
    assert {
        (m.sleep_level, m.policy.idle_threshold_seconds, m.affinity) for m in config.models
    } == {(2, 30, "header:X-Session-Id")}
    assert {m.scaling for m in config.models} == {ScalingPolicy(min_awake=1, target_in_flight=4)}
    assert summary(config).startswith("OK: 1 model (1 vllm), 3 engines,")


def test_replicas_without_scaling_scale_to_zero_and_one_engine_has_no_scaler() -> None:
    (first, *_) = parse_config(replicated(), "cfg.yaml").models
    assert first.scaling == ScalingPolicy()
    (one,) = parse_config(minimal(), "cfg.yaml").models
    assert (one.name, one.served_name, one.replica, one.scaling) == ("m", "m", "0", None)


def test_replica_and_scaling_mistakes_are_named_by_path() -> None:
    doc = replicated(
        url="http://127.0.0.1:9000",
        scaling={"min_awake": 4, "max_awake": 2, "target_kv_cache_usage": 1.5, "bogus": 1},
        affinity="cookie",
    )
    doc["models"][0]["replicas"][1] = {"url": "http://127.0.0.1:8000", "idle_threshold_seconds": 3}
    doc["models"][0]["replicas"].append(5)
    assert sorted(problems_of(doc)) == sorted(
        [
            "cfg.yaml: models[0].scaling.bogus: unknown key 'bogus'",
            "cfg.yaml: models[0].scaling.target_kv_cache_usage: must be at most 1, got 1.5",
            "cfg.yaml: models[0].scaling.max_awake: must be at least min_awake (4), got 2",
            "cfg.yaml: models[0].affinity: expected user or header:NAME (an HTTP header name),"
            " got string 'cookie'",
            "cfg.yaml: models[0].url: give it per replica (under replicas), not here",
            "cfg.yaml: models[0].replicas[1].idle_threshold_seconds: unknown key"
            " 'idle_threshold_seconds'",
            "cfg.yaml: models[0].replicas[3]: expected a mapping, got integer 5",
            "cfg.yaml: models[0].replicas[1].url: http://127.0.0.1:8000 is the same host:port as"
            " models[0].replicas[0]",
        ]
    )


def test_an_engine_name_may_not_be_another_models_name() -> None:
    doc = replicated()
    doc["models"].append({"name": "m@1", "engine": "vllm", "url": "http://127.0.0.1:9000"})
    assert problems_of(doc) == [
        "cfg.yaml: models[0].replicas[1]: its engine name 'm@1' is another model's name"
    ]
