"""Typed configuration: the canonical form and the kvcached controller's form, validated whole.

Both forms become the same immutable `Config`, so the rest of kvsleep never knows which one an
operator wrote. Validation collects every problem before giving up, because a config that fails
one problem at a time costs a restart per typo; each problem names its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

ENGINES = ("vllm", "sglang")


@dataclass(frozen=True)
class SleepPolicy:
    """Policy keys of `sleep_manager`; every one can be overridden per model."""

    idle_threshold_seconds: float = 300.0
    check_interval_seconds: float = 60.0
    auto_sleep_enabled: bool = False
    wakeup_on_request: bool = True
    min_sleep_duration: float = 80.0
    wake_timeout_seconds: float = 300.0
    max_held_requests: int = 1024
    # Bodies of held requests stay in memory until the wake: bound them by size too.
    max_held_bytes: int = 256 * 1024 * 1024
    min_awake_seconds: float = 10.0
    drain_timeout_seconds: float = 120.0
    # `adaptive` learns each model's idle gaps and picks its threshold (kvsleep/adaptive.py)
    # within these bounds; `idle_threshold_seconds` is then what one wake is worth.
    idle_policy: str = "fixed"
    min_idle_threshold_seconds: float = 30.0
    max_idle_threshold_seconds: float = 3600.0
    # After a failed sleep, idle sleeps of the model wait this long, doubling with each further
    # failure up to the maximum; a success, a reload or an engine restart starts over.
    sleep_retry_initial_seconds: float = 30.0
    sleep_retry_max_seconds: float = 1800.0


IDLE_POLICIES = ("fixed", "adaptive")


@dataclass(frozen=True)
class RouterConfig:
    """The router's listener and limits; the admin token is read from the environment so that
    it never sits in a config file (and `repr` leaves it out so it never reaches a log)."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_token_env: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 16 * 1024 * 1024
    connect_timeout_seconds: float = 5.0
    upstream_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 30.0
    listen_backlog: int = 1024
    hold_keepalive_seconds: float = 5.0
    # What one client can cost (kvsleep/connections.py): 0 connections = from the file limit.
    max_client_connections: int = 0
    idle_timeout_seconds: float = 75.0
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    body_min_bytes_per_second: int = 64 * 1024
    max_held_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    """One engine, whichever form it came from; `policy` already has its overrides applied,
    so consumers never merge policy themselves."""

    name: str
    engine: str
    url: str
    policy: SleepPolicy = field(default_factory=SleepPolicy)
    sleep_level: int = 1
    always_on: bool = False
    weights_path: str | None = None
    command: tuple[str, ...] | None = None
    engine_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    venv_path: str | None = None
    log_file: str | None = None
    ready_timeout_seconds: float = 600.0
    memory_gb: float | None = None
    gpus: tuple[int, ...] = ()
    wake_eta_seconds: float | None = None
    # auto: a launched engine gets the sleep flags and env it lacks; none: its command as is.
    engine_flags: str = "auto"
    # A launched engine's processes get SIGTERM, then SIGKILL after this long.
    stop_grace_seconds: float = 10.0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def launched(self) -> bool:
        """True when kvsleep starts this engine itself (a command, or kvcached engine_args)."""
        return self.command is not None or bool(self.engine_args)


@dataclass(frozen=True)
class GpuConfig:
    """A GPU's memory, so that the models' `memory_gb` can be weighed against what it holds."""

    id: int
    memory_gb: float


@dataclass(frozen=True)
class PolicySource:
    """Where idle rules read traffic: this process alone, or Prometheus for a fleet of routers."""

    type: str = "local"
    url: str | None = None
    query_timeout_seconds: float = 5.0
    max_staleness_seconds: float = 120.0


@dataclass(frozen=True)
class FleetConfig:
    """Other kvsleep replicas in front of the same engines; no peers = this replica alone.

    Each model is owned by one replica (rendezvous hashing over `self_url` and `peers`, so every
    replica computes the same owner): only the owner sleeps and wakes its engine, after every
    peer has drained it; the others ask the owner to wake it.
    """

    self_url: str | None = None
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole validated file; `source` names it in later messages (reloads, logs)."""

    router: RouterConfig = field(default_factory=RouterConfig)
    sleep_manager: SleepPolicy = field(default_factory=SleepPolicy)
    models: tuple[ModelConfig, ...] = ()
    gpus: tuple[GpuConfig, ...] = ()
    state_dir: str = "./.kvsleep-state"
    log_dir: str = "./.kvsleep-logs"
    policy_source: PolicySource = field(default_factory=PolicySource)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    # Route to engines that already run, launching none (kvcached's frontend.py alone).
    attach: bool = False
    source: str = "<config>"
    warnings: tuple[str, ...] = ()  # what parsing let pass (see parse_config's `secrets`)

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


class ConfigError(Exception):
    """Every problem found, each formatted `FILE: key.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_config(data: object, source: str = "<config>", *, secrets: bool = True) -> Config:
    """Validate a decoded YAML document (either form) into a Config, or raise ConfigError.

    `secrets=False` (checking or replaying a config, not serving it) turns a missing secret
    such as the admin token into a warning (`Config.warnings`), so that CI or a laptop need not
    hold production secrets."""
    check = _Checker(source, secrets)
    config = _parse_document(check, data)
    if check.problems or config is None:
        raise ConfigError(check.problems)
    return dataclasses.replace(config, warnings=tuple(check.warnings))


def load_config(path: str, *, secrets: bool = True) -> Config:
    """Read and parse a YAML file (see parse_config); unreadable files and YAML syntax errors
    are ConfigErrors too."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc

    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # control characters (e.g. NUL) are refused up front
        raise ConfigError([f"{path}: character {exc.position + 1}: YAML syntax error: "
                           f"unacceptable character #x{exc.character:04x}"]) from exc
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        reason = exc.problem or exc.context or str(exc)
        raise ConfigError([f"{path}: {where}: YAML syntax error: {reason}"]) from exc
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: PyYAML's int() of a huge number
        raise ConfigError([f"{path}: YAML: {exc}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{path}: YAML: nested too deeply"]) from exc
    finally:
        loader.dispose()

    check = _Checker(path, secrets)
    for line, key in loader.duplicate_keys:
        check.report(f"line {line}", f"duplicate key '{key}' (the later value would silently win)")
    config = _parse_document(check, data)
    if check.problems or config is None:
        raise ConfigError(check.problems)
    config = dataclasses.replace(config, warnings=tuple(check.warnings))
    return _resolve_paths(config, os.path.dirname(os.path.abspath(path)))


# What a running kvsleep cannot change: its listener, its files, its peers, the engines it runs.
_RESTART_ROUTER_KEYS = ("host", "port", "listen_backlog", "shutdown_grace_seconds")
_RESTART_KEYS = ("state_dir", "log_dir", "fleet", "policy_source", "attach")
_LAUNCH_KEYS = ("url", "command", "engine_args", "env", "venv_path", "log_file",
                "ready_timeout_seconds")


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys whose change `new` makes and a reload cannot apply (a reload applies every
    other key, or none)."""
    keys = [f"router.{key}" for key in _RESTART_ROUTER_KEYS
            if getattr(old.router, key) != getattr(new.router, key)]
    keys += [key for key in _RESTART_KEYS if getattr(old, key) != getattr(new, key)]
    if old.attach and new.attach:
        return keys  # nothing is launched: engines come and go with a reload
    before = {model.name: model for model in old.models}
    for i, model in enumerate(new.models):
        was = before.pop(model.name, None)
        if was is None:
            if model.launched:
                keys.append(f"models[{i}] ({model.name}, a new engine to launch)")
        elif was.launched or model.launched:
            keys += [f"models[{i}].{key}" for key in _LAUNCH_KEYS
                     if getattr(was, key) != getattr(model, key)]
    keys += [f"models ({name}, a launched engine removed)"
             for name, was in before.items() if was.launched]
    return keys


def summary(config: Config) -> str:
    """One line for `check-config`: models per engine, router address, auto sleep on/off."""
    engines = Counter(model.engine for model in config.models)
    per_engine = ", ".join(f"{engines[name]} {name}" for name in ENGINES if engines[name])
    count = len(config.models)
    plural = "" if count == 1 else "s"
    sleepy = sum(model.policy.auto_sleep_enabled for model in config.models)
    if sleepy == 0:
        auto = "auto sleep off"
    elif sleepy == count:
        auto = "auto sleep on"
    else:
        auto = f"auto sleep on for {sleepy} of {count} models"
    router = f"{_url_host(config.router.host)}:{config.router.port}"
    return f"OK: {count} model{plural} ({per_engine}), router on {router}, {auto}"


# --- Validation machinery ---------------------------------------------------------------------

# Returned by a converter that has reported a problem, so callers keep the default and go on.
_INVALID: Any = object()

_Converter = Callable[["_Checker", str, Any], Any]

# Hosts that all reach this machine: two engines on "localhost:8000" and "127.0.0.1:8000" clash.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""})


class _Checker:
    """Records problems with the key path they concern, so one pass reports them all."""

    def __init__(self, source: str, secrets: bool = True) -> None:
        self.source = source
        self.secrets = secrets
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def missing_secret(self, path: str, message: str) -> None:
        """A problem where the config is to be served, a warning where it is only checked."""
        if self.secrets:
            self.report(path, message)
        else:
            self.warnings.append(f"{self.source}: {path}: {message} (needed by kvsleep serve)")

    def report(self, path: str, message: str) -> Any:
        self.problems.append(f"{self.source}: {path or '(top level)'}: {message}")
        return _INVALID

    def wrong_type(self, path: str, expected: str, value: object) -> Any:
        return self.report(path, f"expected {expected}, got {_describe(value)}")

    def mapping(self, path: str, value: object) -> dict[Any, Any]:
        """A section as a dict; an absent or empty (null) section is an empty one."""
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        self.wrong_type(path, "a mapping", value)
        return {}

    def known_keys(self, path: str, data: dict[Any, Any], allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in data:
            if not isinstance(key, str):
                self.report(path, f"key {_describe(key)} is not a string")
            elif key not in allowed:
                self.report(_join(path, key), _unknown_key(key, allowed))

    def fields(
        self,
        path: str,
        data: dict[Any, Any],
        spec: dict[str, _Converter],
        required: Sequence[str] = (),
        aliases: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Convert every known key of `data` (by `spec`); unknown and missing keys are problems.

        `aliases` maps other spellings of a key (the kvcached form's) onto its `spec` name;
        giving both spellings is a problem because one would silently lose.
        """
        aliases = aliases or {}
        self.known_keys(path, data, [*spec, *aliases])
        values: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in data.items():
            target = aliases.get(key, key) if isinstance(key, str) else None
            if target not in spec:
                continue
            if target in spelled:
                self.report(_join(path, key), f"same setting as '{spelled[target]}'; give one")
                continue
            spelled[target] = key
            converted = spec[target](self, _join(path, key), value)
            if converted is not _INVALID:
                values[target] = converted
        for key in required:
            if key not in spelled:
                self.report(_join(path, key), f"missing required key '{key}'")
        return values


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def _describe(value: object) -> str:
    """Type and value for a message, bounded so a pasted blob cannot flood the output."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}" if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


# --- Converters: (checker, key path, raw value) -> typed value, or _INVALID once reported ------


def _boolean(check: _Checker, path: str, value: object) -> Any:
    if isinstance(value, bool):
        return value
    return check.wrong_type(path, "true or false", value)


def _text(check: _Checker, path: str, value: object) -> Any:
    if not isinstance(value, str):
        return check.wrong_type(path, "a string", value)
    if not value.strip():
        return check.report(path, "must not be empty")
    return value


def _optional(convert: _Converter) -> _Converter:
    """Null means "not set", so a key left blank in YAML keeps its default."""

    def optional(check: _Checker, path: str, value: object) -> Any:
        return None if value is None else convert(check, path, value)

    return optional


def _number(unit: str, *, positive: bool = False) -> _Converter:
    """A non-negative (or positive) int or float; YAML booleans are not numbers."""

    def number(check: _Checker, path: str, value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return check.wrong_type(path, f"a number of {unit}", value)
        try:
            result = float(value)
        except OverflowError:
            return check.report(path, "is too large")
        if not math.isfinite(result):
            return check.report(path, f"must be a finite number of {unit}, got {result}")
        if positive and result <= 0:
            return check.report(path, f"must be > 0, got {result:g}")
        if result < 0:
            return check.report(path, f"must be >= 0, got {result:g}")
        return result

    return number


def _integer(low: int, high: int | None = None) -> _Converter:
    def integer(check: _Checker, path: str, value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            return check.wrong_type(path, "an integer", value)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            return check.report(path, f"must be {bounds}, got {_describe(value)}")
        return value

    return integer


_seconds = _number("seconds")
_positive_seconds = _number("seconds", positive=True)
_port = _integer(1, 65535)
_gpu_id = _integer(0)


def _sleep_level(check: _Checker, path: str, value: object) -> Any:
    if type(value) is not int or value not in (0, 1, 2):
        return check.report(path, f"must be 0, 1 or 2, got {_describe(value)}")
    return value


def _engine(check: _Checker, path: str, value: object) -> Any:
    name = _text(check, path, value)
    if name is _INVALID:
        return name
    # The kvcached controller also takes "sgl" and any letter case.
    engine = {"sgl": "sglang"}.get(name.lower(), name.lower())
    if engine not in ENGINES:
        return check.report(
            path, f"unknown engine {name!r} (expected one of: {', '.join(ENGINES)})"
        )
    return engine


def _scalar_text(check: _Checker, path: str, value: object) -> Any:
    """Env values and argv items: YAML turns `0.95` or `true` into numbers and booleans."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        try:
            return str(value)
        except ValueError:  # an int too long for str()
            return check.report(path, "is too large")
    return check.wrong_type(path, "a string, number or boolean", value)


def _split(check: _Checker, path: str, text: str) -> Any:
    try:
        return shlex.split(text)
    except ValueError as exc:
        return check.report(path, f"cannot split {_describe(text)} into arguments: {exc}")


def _command(check: _Checker, path: str, value: object) -> Any:
    """A list is taken as argv as is; a string is split like a shell would."""
    if isinstance(value, str):
        argv = _split(check, path, value)
    elif isinstance(value, list):
        argv = [_scalar_text(check, f"{path}[{i}]", item) for i, item in enumerate(value)]
    else:
        return check.wrong_type(path, "a list of strings or a string", value)
    if argv is _INVALID or _INVALID in argv:
        return _INVALID
    if not argv:
        return check.report(path, "must not be empty")
    return tuple(argv)


def _engine_args(check: _Checker, path: str, value: object) -> Any:
    """kvcached's spelling: every list item is split, so "--port 12346" is two tokens."""
    if isinstance(value, str):
        return _INVALID if (split := _split(check, path, value)) is _INVALID else tuple(split)
    if not isinstance(value, list):
        return check.wrong_type(path, "a list of strings or a string", value)
    tokens: list[str] = []
    valid = True
    for i, item in enumerate(value):
        text = _scalar_text(check, f"{path}[{i}]", item)
        split = _INVALID if text is _INVALID else _split(check, f"{path}[{i}]", text)
        if split is _INVALID:
            valid = False
        else:
            tokens.extend(split)
    return tuple(tokens) if valid else _INVALID


def _env_name(check: _Checker, path: str, value: object) -> Any:
    name = _text(check, path, value)
    if name is not _INVALID and "=" in name:
        return check.report(path, f"environment variable name {name!r} contains '='")
    return name


def _env_mapping(check: _Checker, path: str, value: object) -> Any:
    data = check.mapping(path, value)
    env: dict[str, str] = {}
    for key, raw in data.items():
        name = _env_name(check, path, key)
        text = _scalar_text(check, _join(path, key), raw)
        if name is not _INVALID and text is not _INVALID:
            env[name] = text
    return env


def _env_list(check: _Checker, path: str, value: object) -> Any:
    """kvcached's `["KEY=VALUE", ...]` lists."""
    if value is None:
        return {}
    if not isinstance(value, list):
        return check.wrong_type(path, 'a list of "KEY=VALUE" strings', value)
    env: dict[str, str] = {}
    for i, item in enumerate(value):
        key, equals, text = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not equals or not key.strip():
            check.wrong_type(f"{path}[{i}]", 'a "KEY=VALUE" string', item)
            continue
        env[key] = text
    return env


def _gpu_ids(check: _Checker, path: str, value: object) -> Any:
    if not isinstance(value, list):
        return check.wrong_type(path, "a list of GPU ids", value)
    ids = [_gpu_id(check, f"{path}[{i}]", item) for i, item in enumerate(value)]
    return _INVALID if _INVALID in ids else tuple(ids)


def _http_url(check: _Checker, path: str, value: object) -> Any:
    """Parsed http(s) URL with a host, or _INVALID; shared by engine URLs and Prometheus."""
    text = _text(check, path, value)
    if text is _INVALID:
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return check.report(path, f"bad URL {text!r}: {exc}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return check.report(path, f"bad URL {text!r}: expected http://host:port")
    if port == 0:
        return check.report(path, f"bad URL {text!r}: port must be between 1 and 65535")
    return parts


def _prometheus_url(check: _Checker, path: str, value: object) -> Any:
    """Unlike an engine's, Prometheus' URL may carry a path (behind a proxy, say)."""
    parts = _http_url(check, path, value)
    return parts if parts is _INVALID else parts.geturl()


def _choice(*options: str) -> _Converter:
    def choice(check: _Checker, path: str, value: object) -> Any:
        if isinstance(value, str) and value in options:
            return value
        return check.report(path, f"expected one of {', '.join(options)}, got {_describe(value)}")

    return choice


def _engine_url(check: _Checker, path: str, value: object) -> Any:
    """Only scheme, host and port: the router appends the OpenAI paths itself."""
    parts = _http_url(check, path, value)
    if parts is _INVALID:
        return parts
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return check.report(path, f"bad URL {parts.geturl()!r}: expected http://host:port only")
    return f"{parts.scheme}://{parts.netloc}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_key(host: str) -> str:
    host = host.lower()
    return "loopback" if host in _LOOPBACK else host


# --- Sections ---------------------------------------------------------------------------------

_TOP_KEYS = (
    "router",
    "sleep_manager",
    "models",
    "gpus",
    "state_dir",
    "log_dir",
    "policy_source",
    "fleet",
    "kvcached",
    "instances",
    "attach",
)

_POLICY_FIELDS: dict[str, _Converter] = {
    "idle_threshold_seconds": _seconds,
    "check_interval_seconds": _positive_seconds,
    "auto_sleep_enabled": _boolean,
    "wakeup_on_request": _boolean,
    "min_sleep_duration": _seconds,
    "wake_timeout_seconds": _positive_seconds,
    "max_held_requests": _integer(0),
    "max_held_bytes": _integer(0),
    "min_awake_seconds": _seconds,
    "drain_timeout_seconds": _seconds,
    "idle_policy": _choice(*IDLE_POLICIES),
    "min_idle_threshold_seconds": _seconds,
    "max_idle_threshold_seconds": _positive_seconds,
    "sleep_retry_initial_seconds": _seconds,
    "sleep_retry_max_seconds": _seconds,
}

_ROUTER_FIELDS: dict[str, _Converter] = {
    "host": _text,
    "port": _port,
    "admin_token_env": _optional(_env_name),
    "max_body_bytes": _integer(1),
    "connect_timeout_seconds": _positive_seconds,
    "upstream_timeout_seconds": _positive_seconds,
    "shutdown_grace_seconds": _seconds,
    "listen_backlog": _integer(1),
    "hold_keepalive_seconds": _seconds,
    "max_client_connections": _integer(0),
    "idle_timeout_seconds": _positive_seconds,
    "header_timeout_seconds": _positive_seconds,
    "body_timeout_seconds": _positive_seconds,
    "body_min_bytes_per_second": _integer(1),
    "max_held_bytes": _integer(0),
    # kvcached's switch for its separately launched router; kvsleep always routes.
    "enable_router": _boolean,
}
_ROUTER_ALIASES = {"router_host": "host", "router_port": "port"}

_GPU_FIELDS: dict[str, _Converter] = {"id": _gpu_id, "memory_gb": _number("GB", positive=True)}

_POLICY_SOURCE_FIELDS: dict[str, _Converter] = {
    "type": _choice("local", "prometheus"),
    "url": _optional(_prometheus_url),
    "query_timeout_seconds": _positive_seconds,
    "max_staleness_seconds": _seconds,
}

# Keys a model takes in both forms; in the kvcached form they are kvsleep's additions.
_MODEL_EXTRA_FIELDS: dict[str, _Converter] = {
    "sleep_level": _sleep_level,
    "always_on": _boolean,
    "weights_path": _optional(_text),
    "log_file": _optional(_text),
    "ready_timeout_seconds": _positive_seconds,
    "memory_gb": _optional(_number("GB", positive=True)),
    "gpus": _gpu_ids,
    "wake_eta_seconds": _optional(_seconds),
    "engine_flags": _choice("auto", "none"),
    "stop_grace_seconds": _seconds,
    **_POLICY_FIELDS,
}

_MODEL_FIELDS: dict[str, _Converter] = {
    "name": _text,
    "engine": _engine,
    "url": _engine_url,
    "command": _optional(_command),
    "env": _env_mapping,
    **_MODEL_EXTRA_FIELDS,
}

_INSTANCE_FIELDS: dict[str, _Converter] = {
    "name": _text,
    "model": _text,
    "engine": _engine,
    "using_venv": _boolean,
    "venv_path": _optional(_text),
    "kvcached_env": _env_list,
    "engine_env": _env_list,
    "engine_args": _engine_args,
    **_MODEL_EXTRA_FIELDS,
}


class _Entry(NamedTuple):
    """A parsed model and where it came from, for problems that involve two models."""

    path: str
    address_key: str
    model: ModelConfig


def _parse_document(check: _Checker, data: object) -> Config | None:
    if data is None:
        check.report("", "the document is empty; expected a mapping of settings")
        return None
    if not isinstance(data, dict):
        check.wrong_type("", "a mapping of settings at the top level", data)
        return None
    check.known_keys("", data, _TOP_KEYS)
    kvcached_form = "instances" in data
    if kvcached_form and "models" in data:
        check.report(
            "models", "give either models (canonical form) or instances (kvcached form), not both"
        )
    if "kvcached" in data and not kvcached_form:
        check.report(
            "kvcached", "sets env vars for kvcached-form instances; with models, use models[].env"
        )

    router = _parse_router(check, data.get("router"))
    policy = dataclasses.replace(
        SleepPolicy(),
        **check.fields(
            "sleep_manager",
            check.mapping("sleep_manager", data.get("sleep_manager")),
            _POLICY_FIELDS,
        ),
    )
    _check_bounds(check, "sleep_manager", policy)
    gpus = _parse_gpus(check, data.get("gpus"))
    gpu_ids = None if data.get("gpus") is None else {gpu.id for gpu in gpus}
    if kvcached_form:
        shared_env = _env_mapping(check, "kvcached", data.get("kvcached"))
        shared_env = {key.upper(): value for key, value in shared_env.items()}
        entries = _parse_instances(check, data["instances"], policy, gpu_ids, shared_env)
        _check_names(check, "instances", "model", data["instances"])
    else:
        entries = _parse_models(check, data.get("models"), policy, gpu_ids)
        _check_names(check, "models", "name", data.get("models"))
    _check_addresses(check, entries, router)

    dirs = {key: _text(check, key, data[key]) for key in ("state_dir", "log_dir") if key in data}
    attach = _boolean(check, "attach", data.get("attach", False))
    return Config(
        router=router,
        sleep_manager=policy,
        models=tuple(entry.model for entry in entries),
        gpus=gpus,
        policy_source=_parse_policy_source(check, data.get("policy_source")),
        fleet=_parse_fleet(check, data.get("fleet")),
        attach=attach is True,
        source=check.source,
        **{key: value for key, value in dirs.items() if value is not _INVALID},
    )


def _parse_router(check: _Checker, value: object) -> RouterConfig:
    values = check.fields(
        "router", check.mapping("router", value), _ROUTER_FIELDS, aliases=_ROUTER_ALIASES
    )
    values.pop("enable_router", None)
    env_name = values.get("admin_token_env")
    if env_name:
        token = os.environ.get(env_name)
        if token:
            values["admin_token"] = token
        else:
            state = "empty" if token == "" else "not set"
            check.missing_secret("router.admin_token_env",
                                 f"environment variable {env_name} is {state}")
    return RouterConfig(**values)


def _parse_gpus(check: _Checker, value: object) -> tuple[GpuConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        check.wrong_type("gpus", "a list of {id, memory_gb}", value)
        return ()
    gpus: list[GpuConfig] = []
    for i, item in enumerate(value):
        path = f"gpus[{i}]"
        if not isinstance(item, dict):
            check.wrong_type(path, "a mapping with id and memory_gb", item)
            continue
        values = check.fields(path, item, _GPU_FIELDS, required=("id", "memory_gb"))
        if len(values) < 2:
            continue
        if any(gpu.id == values["id"] for gpu in gpus):
            check.report(f"{path}.id", f"GPU {values['id']} is listed twice")
            continue
        gpus.append(GpuConfig(**values))
    return tuple(gpus)


def _parse_policy_source(check: _Checker, value: object) -> PolicySource:
    data = check.mapping("policy_source", value)
    values = check.fields("policy_source", data, _POLICY_SOURCE_FIELDS)
    if values.get("type") == "prometheus" and data.get("url") is None:
        check.report("policy_source.url", "required when type is prometheus")
    return PolicySource(**values)


def _replica_url(check: _Checker, path: str, value: object) -> Any:
    parts = _http_url(check, path, value)
    return parts if parts is _INVALID else parts.geturl().rstrip("/")


def _replica_urls(check: _Checker, path: str, value: object) -> Any:
    if not isinstance(value, list):
        return check.wrong_type(path, "a list of replica URLs", value)
    urls = [_replica_url(check, f"{path}[{i}]", item) for i, item in enumerate(value)]
    return tuple(url for url in urls if url is not _INVALID)


_FLEET_FIELDS: dict[str, _Converter] = {
    "self_url": _optional(_replica_url),
    "peers": _replica_urls,
}


def _parse_fleet(check: _Checker, value: object) -> FleetConfig:
    values = check.fields("fleet", check.mapping("fleet", value), _FLEET_FIELDS)
    if values.get("peers") and not values.get("self_url"):
        check.report("fleet.self_url", "required when fleet.peers is given (the URL peers use "
                     "to reach this replica)")
    return FleetConfig(**values)


def _entries(check: _Checker, key: str, value: object) -> list[Any]:
    if value is None or value == []:
        check.report(key, "no models configured")
        return []
    if not isinstance(value, list):
        check.wrong_type(key, "a list of models", value)
        return []
    return value


def _parse_models(
    check: _Checker, value: object, policy: SleepPolicy, gpu_ids: set[int] | None
) -> list[_Entry]:
    entries: list[_Entry] = []
    for i, item in enumerate(_entries(check, "models", value)):
        path = f"models[{i}]"
        if not isinstance(item, dict):
            check.wrong_type(path, "a mapping", item)
            continue
        values = check.fields(path, item, _MODEL_FIELDS, required=("name", "engine", "url"))
        if {"name", "engine", "url"} <= values.keys():
            model = _finish_model(check, path, values, policy, gpu_ids)
            entries.append(_Entry(path, "url", model))
    return entries


def _parse_instances(
    check: _Checker,
    value: object,
    policy: SleepPolicy,
    gpu_ids: set[int] | None,
    shared_env: dict[str, str],
) -> list[_Entry]:
    entries: list[_Entry] = []
    for i, item in enumerate(_entries(check, "instances", value)):
        path = f"instances[{i}]"
        if not isinstance(item, dict):
            check.wrong_type(path, "a mapping", item)
            continue
        values = check.fields(
            path,
            item,
            _INSTANCE_FIELDS,
            required=("model", "engine"),
            aliases={"args": "engine_args"},
        )
        values.pop("name", None)
        # The seed applies engine_env first, then kvcached_env over it.
        env = {**shared_env, **values.pop("engine_env", {}), **values.pop("kvcached_env", {})}
        venv_path = values.pop("venv_path", None)
        if values.pop("using_venv", False):
            if venv_path is None:
                check.report(f"{path}.venv_path", "required when using_venv is true")
            values["venv_path"] = venv_path
        args_key = "args" if "args" in item else "engine_args"
        if "engine_args" in values:
            url = _instance_url(check, f"{path}.{args_key}", values["engine_args"])
        elif args_key in item:
            url = _INVALID  # given but malformed, and reported as such
        else:
            url = check.report(
                f"{path}.engine_args",
                "missing required key 'engine_args' (its --port says where the engine listens)",
            )
        if url is _INVALID or not {"model", "engine"} <= values.keys():
            continue
        values["name"] = values.pop("model")
        model = _finish_model(check, path, {**values, "url": url, "env": env}, policy, gpu_ids)
        entries.append(_Entry(path, args_key, model))
    return entries


def _flag_values(tokens: Sequence[str], flag: str) -> list[str | None]:
    """Every value given to `flag`, as `--flag=V` or `--flag V` (None when V is missing)."""
    found: list[str | None] = []
    for i, token in enumerate(tokens):
        if token == flag:
            found.append(tokens[i + 1] if i + 1 < len(tokens) else None)
        elif token.startswith(flag + "="):
            found.append(token[len(flag) + 1 :])
    return found


def _instance_url(check: _Checker, path: str, tokens: Sequence[str]) -> Any:
    """The kvcached form has no URL: the engine's own --host/--port say where it listens."""
    hosts = _flag_values(tokens, "--host")
    ports = _flag_values(tokens, "--port")
    if not ports:
        return check.report(path, "no --port given (kvsleep reaches the instance at --host/--port)")
    # The engines parse argv with argparse, where the last occurrence wins.
    host, port = (hosts[-1] if hosts else "127.0.0.1"), ports[-1]
    if host is None or port is None:
        return check.report(path, f"{'--host' if host is None else '--port'} has no value")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return check.report(path, f"--port {port!r} is not a port number (1-65535)")
    # A server bound to every interface is reached through loopback.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return _engine_url(check, path, f"http://{_url_host(host)}:{int(port)}")


def _finish_model(
    check: _Checker,
    path: str,
    values: dict[str, Any],
    policy: SleepPolicy,
    gpu_ids: set[int] | None,
) -> ModelConfig:
    """Checks that span keys of one model, and the per-model policy merged over the global one."""
    overrides = {key: values.pop(key) for key in list(values) if key in _POLICY_FIELDS}
    if values["engine"] == "sglang":
        if values.get("sleep_level", 1) != 1:
            check.report(
                f"{path}.sleep_level",
                "sleep levels are a vLLM feature; SGLang always releases all memory (leave it out)",
            )
        if values.get("weights_path") is None:
            values["weights_path"] = values["name"]
    if gpu_ids is not None:
        for i, gpu in enumerate(values.get("gpus", ())):
            if gpu not in gpu_ids:
                check.report(f"{path}.gpus[{i}]", f"GPU {gpu} is not in the gpus section")
    merged = dataclasses.replace(policy, **overrides)
    if overrides.keys() & {"min_idle_threshold_seconds", "max_idle_threshold_seconds"}:
        _check_bounds(check, path, merged)
    return ModelConfig(policy=merged, **values)


def _check_bounds(check: _Checker, path: str, policy: SleepPolicy) -> None:
    """The adaptive threshold's bounds must leave it somewhere to be."""
    low, high = policy.min_idle_threshold_seconds, policy.max_idle_threshold_seconds
    if low > high:
        check.report(f"{path}.min_idle_threshold_seconds",
                     f"must be <= max_idle_threshold_seconds ({high:g}), got {low:g}")


def _check_names(check: _Checker, key: str, name_key: str, items: object) -> None:
    """Names must be unique to route. Checked on the raw entries, so that a duplicate shows
    in the same report as the other problems of those entries."""
    if not isinstance(items, list):
        return
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        name = item.get(name_key) if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            continue
        path = f"{key}[{i}]"
        if name in seen:
            check.report(f"{path}.{name_key}", f"duplicate model name {name!r} (also {seen[name]})")
        seen.setdefault(name, path)


def _check_addresses(check: _Checker, entries: list[_Entry], router: RouterConfig) -> None:
    """Addresses must be unique, or two engines fight over one port."""
    addresses: dict[tuple[str, int], str] = {}
    router_address = (_host_key(router.host), router.port)
    for path, address_key, model in entries:
        address = (_host_key(model.host), model.port)
        if address in addresses:
            check.report(
                f"{path}.{address_key}",
                f"{model.url} is the same host:port as {addresses[address]}",
            )
        elif address == router_address:
            check.report(f"{path}.{address_key}", f"{model.url} is the router's own address")
        addresses.setdefault(address, path)


# --- Files ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that notes duplicate keys, which PyYAML would resolve silently to the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    self.duplicate_keys.append((key_node.start_mark.line + 1, key_node.value))
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _resolve_paths(config: Config, base: str) -> Config:
    """Relative paths in a file mean relative to that file, wherever kvsleep was started."""

    def resolve(path: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

    def maybe(path: str | None) -> str | None:
        return None if path is None else resolve(path)

    models = tuple(
        dataclasses.replace(
            model, log_file=maybe(model.log_file), venv_path=maybe(model.venv_path)
        )
        for model in config.models
    )
    return dataclasses.replace(
        config,
        state_dir=resolve(config.state_dir),
        log_dir=resolve(config.log_dir),
        models=models,
    )
