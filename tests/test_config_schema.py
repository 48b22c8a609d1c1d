"""The config's JSON Schema (`kvsleep config-schema`): valid, true to the checker, never drifting.

Editors validate with the schema as one types; `kvsleep check-config` remains the authority. So
the schema must never refuse a file kvsleep accepts, must name exactly the keys the checker
takes, and must catch every problem of one value on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kvsleep.config import (
    Config,
    ConfigError,
    FleetConfig,
    GpuConfig,
    ModelConfig,
    PolicySource,
    RouterConfig,
    SleepPolicy,
    config_schema,
    parse_config,
)
from kvsleep.core.scaling import ScalingPolicy

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMA = config_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
# Editor plugins that know only draft-07 must read it the same way.
DRAFT_7 = jsonschema.Draft7Validator(SCHEMA)


def schema_errors(document: object) -> list[str]:
    errors = [error.message for error in VALIDATOR.iter_errors(document)]
    assert bool(errors) == bool(list(DRAFT_7.iter_errors(document))), errors
    return errors


def checker_problems(document: object) -> list[str]:
    try:
        parse_config(document, "cfg.yaml", secrets=False)
    except ConfigError as exc:
        return exc.problems
    return []


def kvsleep_configs() -> list[Path]:
    """Every kvsleep config the repository ships (examples/ also holds other tools' files)."""
    candidates = [
        ROOT / "example-config.yaml",
        ROOT / "kvsleep" / "demo.yaml",
        ROOT / "tests" / "data" / "kvcached-config.yaml",
        *sorted((ROOT / "examples").glob("*.yaml")),
        *sorted(KUBERNETES.glob("*/kvsleep*.yaml")),
        *sorted(KUBERNETES.glob("overlays/*/kvsleep*.yaml")),
    ]
    return [
        path
        for path in candidates
        if {"models", "instances"} & set(yaml.safe_load(path.read_text()) or {})
    ]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_kvsleep_config_schema_prints_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvsleep", "config-schema"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == SCHEMA


@pytest.mark.parametrize("path", kvsleep_configs(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_shipped_config_validates(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert schema_errors(document) == []


def test_the_shipped_configs_cover_both_forms() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in kvsleep_configs()}
    assert {"example-config.yaml", "examples/demo.yaml", "tests/data/kvcached-config.yaml"} <= names
    assert any(name.startswith("deploy/") for name in names)


MODEL = {"name": "m", "engine": "vllm", "url": "http://127.0.0.1:8001"}
INSTANCE = {"model": "m", "engine": "vllm", "engine_args": ["--port=8001"]}


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"sleep_manger": {}, "models": [MODEL]}, id="unknown top-level key"),
        pytest.param({"router": {"prot": 1}, "models": [MODEL]}, id="unknown router key"),
        pytest.param({"models": [{**MODEL, "enigne": "vllm"}]}, id="unknown model key"),
        pytest.param({"router": {"port": "8080"}, "models": [MODEL]}, id="port as a string"),
        pytest.param({"router": {"port": 70000}, "models": [MODEL]}, id="port out of range"),
        pytest.param(
            {"router": {"port": 1, "router_port": 2}, "models": [MODEL]}, id="two spellings"
        ),
        pytest.param({"sleep_manager": {"idle_policy": "smart"}, "models": [MODEL]}, id="enum"),
        pytest.param(
            {"sleep_manager": {"min_sleep_duration": -5}, "models": [MODEL]}, id="negative"
        ),
        pytest.param(
            {"sleep_manager": {"check_interval_seconds": 0}, "models": [MODEL]}, id="zero"
        ),
        pytest.param({"models": [{**MODEL, "engine": "tgi"}]}, id="unknown engine"),
        pytest.param({"models": [{**MODEL, "url": "127.0.0.1:8000"}]}, id="url without scheme"),
        pytest.param({"models": [{**MODEL, "url": "http://h:1/v1"}]}, id="url with a path"),
        pytest.param({"models": [{"name": "m", "engine": "vllm"}]}, id="missing url"),
        pytest.param({"models": [{**MODEL, "command": []}]}, id="empty command"),
        pytest.param({"models": [{**MODEL, "env": {"A=B": 1}}]}, id="env name with ="),
        pytest.param({"models": [{**MODEL, "gpus": [-1]}]}, id="negative GPU id"),
        pytest.param(
            {"models": [{**MODEL, "engine": "sglang", "sleep_level": 2}]}, id="sglang level"
        ),
        pytest.param({}, id="no models"),
        pytest.param({"models": []}, id="empty models"),
        pytest.param({"models": [MODEL], "instances": [INSTANCE]}, id="both forms"),
        pytest.param({"models": [MODEL], "kvcached": {"x": 1}}, id="kvcached with models"),
        pytest.param({"instances": [{"model": "m", "engine": "vllm"}]}, id="no engine_args"),
        pytest.param({"instances": [{**INSTANCE, "using_venv": True}]}, id="venv without path"),
        pytest.param({"instances": [{**INSTANCE, "kvcached_env": ["NOEQUALS"]}]}, id="env list"),
        pytest.param(
            {"models": [MODEL], "policy_source": {"type": "prometheus"}}, id="prometheus no url"
        ),
        pytest.param(
            {"models": [MODEL], "fleet": {"peers": ["http://10.0.0.2:8080"]}}, id="no self_url"
        ),
        pytest.param({"models": [MODEL], "gpus": [{"id": 0}]}, id="gpu without memory"),
        pytest.param({"models": [MODEL], "attach": "yes"}, id="attach as a string"),
    ],
)
def test_known_bad_documents_fail_both(document: dict[str, Any]) -> None:
    assert schema_errors(document)
    assert checker_problems(document)


# --- The schema and the checker agree on every section's keys ----------------------------------


def place(section: str, key: str, value: object) -> dict[str, Any]:
    """A valid document with `key: value` added to `section` (a $defs name, or "" for the top)."""
    document: dict[str, Any] = {"models": [dict(MODEL)]}
    target: dict[str, Any]
    if section == "":
        target = document
    elif section == "model":
        target = document["models"][0]
    elif section == "instance":
        document = {"instances": [dict(INSTANCE)]}
        target = document["instances"][0]
    elif section == "replica":
        model = document["models"][0]
        target = {"url": model.pop("url")}
        model["replicas"] = [target]
    elif section == "scaling":
        target = document["models"][0].setdefault("scaling", {})
    elif section == "gpu":
        target = {"id": 0, "memory_gb": 1}
        document["gpus"] = [target]
    else:
        target = document.setdefault(section, {})
    target[key] = value
    return document


# Keys that are not a field of the section's dataclass: the kvcached form's.
KVCACHED_ONLY = {
    "": {"kvcached", "instances"},
    "router": {"enable_router", "router_host", "router_port"},
    "instance": {"name", "model", "using_venv", "kvcached_env", "engine_env", "args"},
}


def field_names(cls: type[Any], *, leave_out: tuple[str, ...] = ()) -> set[str]:
    return {item.name for item in dataclasses.fields(cls)} - set(leave_out)


POLICY_KEYS = field_names(SleepPolicy)
FIELDS = {
    "": field_names(Config, leave_out=("source", "warnings")),
    "router": field_names(RouterConfig, leave_out=("admin_token",)),
    "sleep_manager": POLICY_KEYS,
    "model": field_names(
        ModelConfig, leave_out=("policy", "engine_args", "venv_path", "model", "replica")
    )
    | POLICY_KEYS
    | {"replicas"},
    "instance": field_names(
        ModelConfig,
        leave_out=("policy", "name", "url", "command", "env", "scaling", "affinity", "replica"),
    )
    | POLICY_KEYS,
    # What differs between the engines of one model; the rest is the model's.
    "replica": {"url", "command", "env", "log_file", "memory_gb", "gpus", "wake_eta_seconds"},
    "scaling": field_names(ScalingPolicy),
    "gpu": field_names(GpuConfig),
    "policy_source": field_names(PolicySource),
    "fleet": field_names(FleetConfig),
}


def sections() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "", SCHEMA
    yield from SCHEMA["$defs"].items()


def test_every_section_has_a_schema_and_refuses_other_keys() -> None:
    assert {name for name, _ in sections()} == set(FIELDS)
    for _, schema in sections():
        assert schema["additionalProperties"] is False


@pytest.mark.parametrize("section", sorted(FIELDS))
def test_schema_keys_are_the_dataclass_fields_plus_kvcached_spellings(section: str) -> None:
    schema = dict(sections())[section]
    assert set(schema["properties"]) == FIELDS[section] | KVCACHED_ONLY.get(section, set())


@pytest.mark.parametrize("section", sorted(FIELDS))
def test_the_checker_takes_every_schema_key_and_refuses_others(section: str) -> None:
    schema = dict(sections())[section]
    for key in schema["properties"]:
        problems = checker_problems(place(section, key, None))
        assert not [problem for problem in problems if "unknown key" in problem], (key, problems)
    bogus = place(section, "no_such_key", 1)
    assert schema_errors(bogus)
    assert any("unknown key 'no_such_key'" in problem for problem in checker_problems(bogus))


# --- The schema never refuses what the checker accepts ------------------------------------------

# Problems the schema leaves to `check-config`: rules across entries or keys, and what only
# parsing reveals (shell quoting, the --port inside engine_args, infinity).
CHECK_CONFIG_ONLY = (
    "no --port given",
    "is not a port number",
    "has no value",
    "cannot split",
    "finite number",
    "must be <= max_idle_threshold_seconds",
    "is not in the gpus section",
    "is listed twice",
    "duplicate model name",
    "is the same host:port",
    "is the router's own address",
)
VALUES: list[Any] = [
    *(None, True, False, 0, -1, 1, 2, 3, 1.5, -2.5, 10**30, 65536, "", " ", "x", "vllm", "SGL"),
    *("http://127.0.0.1:9", "http://a/b", "ftp://x", "--port=5", "a 'b", "adaptive", "none"),
    *(["a"], [], [1, "b"], {"a": 1}, {}, {"X=Y": 1}, ["K=V"], ["bad"], [0], [-1]),
]
EXTRA_KEYS = [
    *("host", "port", "router_port", "enable_router", "idle_policy", "sleep_level", "url"),
    *("command", "env", "args", "engine_args", "using_venv", "venv_path", "name", "model"),
    *("self_url", "peers", "type", "gpus", "memory_gb", "kvcached", "instances", "id", "bogus"),
]


def mutations(count: int) -> Iterator[object]:
    """Seeded edits of the shipped configs: values replaced, keys removed, keys added."""
    rng = random.Random(13)
    bases = [yaml.safe_load(path.read_text()) for path in kvsleep_configs()]

    def nodes(node: object, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """The path of every value inside `node`."""
        if path:
            yield path
        if isinstance(node, dict):
            for key, child in node.items():
                yield from nodes(child, (*path, key))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from nodes(child, (*path, i))

    for _ in range(count):
        document = copy.deepcopy(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(list(nodes(document)))
            parent = document
            for key in parents:
                parent = parent[key]
            edit = rng.random()
            if edit < 0.6:
                parent[last] = copy.deepcopy(rng.choice(VALUES))
            elif edit < 0.8 and isinstance(parent, dict):
                del parent[last]
            elif isinstance(parent[last], dict):
                parent[last][rng.choice(EXTRA_KEYS)] = copy.deepcopy(rng.choice(VALUES))
        yield document


def schema_can_tell(problem: str) -> bool:
    return not any(part in problem for part in CHECK_CONFIG_ONLY)


def test_schema_and_checker_agree_on_edited_configs() -> None:
    accepted = refused = 0
    for document in mutations(400):
        problems = checker_problems(document)
        errors = schema_errors(document)
        if not problems:
            accepted += 1
            assert errors == [], (document, errors)
        elif any(map(schema_can_tell, problems)):
            refused += 1
            assert errors, (document, problems)
    assert accepted > 50 and refused > 50  # both directions were exercised
