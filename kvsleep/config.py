"""Typed configuration: the canonical form and the kvcached controller's form, validated whole.

Both forms become the same immutable `Config`, so the rest of kvsleep never knows which one an
operator wrote. Validation collects every problem before giving up, because a config that fails
one problem at a time costs a restart per typo; each problem names its key path.

Each key is declared once, on its dataclass field (`metadata`): how its value is read (a `_Kind`:
converter and the JSON Schema of what that converter takes), what it means, its other spellings.
The checker and `config_schema()` are both derived from those declarations, so they cannot drift.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

from kvsleep.core.scaling import ScalingPolicy

ENGINES = ("vllm", "sglang")
IDLE_POLICIES = ("fixed", "adaptive")

# --- Validation machinery ---------------------------------------------------------------------

# Returned by a converter that has reported a problem, so callers keep the default and go on.
_INVALID: Any = object()

_Converter = Callable[["_Checker", str, Any], Any]

# Hosts that all reach this machine: two engines on "localhost:8000" and "127.0.0.1:8000" clash.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""})


class _Kind(NamedTuple):
    """How a key's value is read, and the JSON Schema of the values that reading accepts."""

    convert: _Converter
    schema: dict[str, Any]


@dataclass(frozen=True)
class _Key:
    """One key of the file: its kind, a line for editors, and the other spellings it takes.

    `forms` matters for model keys only: which list (`models`, `instances`) takes the key.
    `restart`: a running kvsleep cannot apply a change of it (of a model key: for an engine
    kvsleep launches), so a reload that changes it is refused (`needs_restart`).
    """

    kind: _Kind
    doc: str
    aliases: tuple[str, ...] = ()
    forms: tuple[str, ...] = ("models", "instances")
    restart: bool = False


def _key(kind: _Kind, doc: str, **options: Any) -> dict[str, _Key]:
    """Field metadata that makes a dataclass field a config key."""
    return {"key": _Key(kind, doc, **options)}


def _setting(default: Any, kind: _Kind, doc: str, **options: Any) -> Any:
    """A config key with a default (a required key is `field(metadata=_key(...))`)."""
    return field(default=default, metadata=_key(kind, doc, **options))


class _Section(NamedTuple):
    """The keys of one mapping, by the name their parsed values take."""

    keys: dict[str, _Key]
    required: tuple[str, ...]
    defaults: dict[str, Any]  # those a schema can show: scalars
    # JSON Schema for rules that span keys; the checker enforces them in code, with its message.
    rules: tuple[dict[str, Any], ...] = ()

    def aliases(self) -> dict[str, str]:
        return {alias: name for name, key in self.keys.items() for alias in key.aliases}


def _section(
    cls: type[Any],
    *,
    form: str | None = None,
    extra: Mapping[str, _Key] | None = None,
    required: Sequence[str] = (),
    rules: Sequence[dict[str, Any]] = (),
) -> _Section:
    """The keys a dataclass declares (fields with a `key`), then `extra` keys that are no field;
    a field without a default is required. A field whose metadata names a dataclass as `inline`
    takes that dataclass's keys, its `note` before their docs (a model takes every policy key)."""
    keys: dict[str, _Key] = {}
    inlined: dict[str, _Key] = {}
    needed = list(required)
    defaults: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        inline_forms = item.metadata.get("forms")
        if "inline" in item.metadata and (
            form is None or inline_forms is None or form in inline_forms
        ):
            # their defaults are the section's, not the dataclass's
            for name, inner in _section(item.metadata["inline"]).keys.items():
                inlined[name] = dataclasses.replace(
                    inner, doc=f"{item.metadata['note']} {inner.doc}"
                )
        key = item.metadata.get("key")
        if key is None or (form is not None and form not in key.forms):
            continue
        keys[item.name] = key
        if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            needed.append(item.name)
        elif item.default is None or isinstance(item.default, (bool, int, float, str)):
            defaults[item.name] = item.default
    return _Section({**keys, **(extra or {}), **inlined}, tuple(needed), defaults, tuple(rules))


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

    def fields(self, path: str, data: dict[Any, Any], section: _Section) -> dict[str, Any]:
        """Convert every known key of `data`; unknown and missing keys are problems.

        Aliases (the kvcached form's spellings) give their key's value; giving two spellings
        of one key is a problem because one would silently lose.
        """
        aliases = section.aliases()
        self.known_keys(path, data, [*section.keys, *aliases])
        values: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in data.items():
            target = aliases.get(key, key) if isinstance(key, str) else None
            if target not in section.keys:
                continue
            if target in spelled:
                self.report(_join(path, key), f"same setting as '{spelled[target]}'; give one")
                continue
            spelled[target] = key
            converted = section.keys[target].kind.convert(self, _join(path, key), value)
            if converted is not _INVALID:
                values[target] = converted
        for key in section.required:
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
    ids = [_GPU_ID.convert(check, f"{path}[{i}]", item) for i, item in enumerate(value)]
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


def _engine_url(check: _Checker, path: str, value: object) -> Any:
    """Only scheme, host and port: the router appends the OpenAI paths itself."""
    parts = _http_url(check, path, value)
    if parts is _INVALID:
        return parts
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return check.report(path, f"bad URL {parts.geturl()!r}: expected http://host:port only")
    return f"{parts.scheme}://{parts.netloc}"


def _replica_url(check: _Checker, path: str, value: object) -> Any:
    parts = _http_url(check, path, value)
    return parts if parts is _INVALID else parts.geturl().rstrip("/")


def _replica_urls(check: _Checker, path: str, value: object) -> Any:
    if not isinstance(value, list):
        return check.wrong_type(path, "a list of replica URLs", value)
    urls = [_replica_url(check, f"{path}[{i}]", item) for i, item in enumerate(value)]
    return tuple(url for url in urls if url is not _INVALID)


def _affinity(check: _Checker, path: str, value: object) -> Any:
    if value == "user" or (
        isinstance(value, str) and value.startswith("header:") and _HEADER.match(value[7:])
    ):
        return value
    return check.wrong_type(path, "user or header:NAME (an HTTP header name)", value)


def _replica_entries(check: _Checker, path: str, value: object) -> Any:
    """The raw replica mappings; _parse_models reads each as a model's engine keys."""
    if not isinstance(value, list) or not value:
        return check.wrong_type(path, "a non-empty list of replicas", value)
    return value


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_key(host: str) -> str:
    host = host.lower()
    return "loopback" if host in _LOOPBACK else host


# --- Kinds: a converter and the JSON Schema of what it accepts ---------------------------------


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _optional(kind: _Kind) -> _Kind:
    """Null means "not set", so a key left blank in YAML keeps its default."""

    def optional(check: _Checker, path: str, value: object) -> Any:
        return None if value is None else kind.convert(check, path, value)

    return _Kind(optional, _nullable(kind.schema))


def _number(unit: str, *, positive: bool = False) -> _Kind:
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

    bound = "exclusiveMinimum" if positive else "minimum"
    return _Kind(number, {"type": "number", bound: 0})


def _integer(low: int, high: int | None = None) -> _Kind:
    def integer(check: _Checker, path: str, value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            return check.wrong_type(path, "an integer", value)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            return check.report(path, f"must be {bounds}, got {_describe(value)}")
        return value

    schema: dict[str, Any] = {"type": "integer", "minimum": low}
    if high is not None:
        schema["maximum"] = high
    return _Kind(integer, schema)


def _choice(*options: str) -> _Kind:
    def choice(check: _Checker, path: str, value: object) -> Any:
        if isinstance(value, str) and value in options:
            return value
        return check.report(path, f"expected one of {', '.join(options)}, got {_describe(value)}")

    return _Kind(choice, {"enum": list(options)})


# Patterns in the dialect that JSON Schema (ECMA-262) and Python's re share.
_NOT_BLANK = r"\S"
_ENV_NAME = r"^[^=]*[^=\s][^=]*$"
_URL = r"^https?://[^/?#]+"
_SCALAR = {"type": ["string", "number", "boolean"]}

_BOOLEAN = _Kind(_boolean, {"type": "boolean"})
_TEXT = _Kind(_text, {"type": "string", "pattern": _NOT_BLANK})
_SECONDS = _number("seconds")
_POSITIVE_SECONDS = _number("seconds", positive=True)
_GB = _number("GB", positive=True)
_PORT = _integer(1, 65535)
_GPU_ID = _integer(0)
_SLEEP_LEVEL = _Kind(_sleep_level, {"enum": [0, 1, 2]})
_ENGINE = _Kind(
    _engine,
    {
        "type": "string",
        "pattern": "^(?:[Vv][Ll][Ll][Mm]|[Ss][Gg][Ll](?:[Aa][Nn][Gg])?)$",
        "examples": list(ENGINES),
    },
)
_COMMAND = _Kind(
    _command,
    {
        "anyOf": [
            {"type": "string", "pattern": _NOT_BLANK},
            {"type": "array", "items": _SCALAR, "minItems": 1},
        ]
    },
)
_ENGINE_ARGS = _Kind(
    _engine_args, {"anyOf": [{"type": "string"}, {"type": "array", "items": _SCALAR}]}
)
_ENV_NAME_KIND = _Kind(_env_name, {"type": "string", "pattern": _ENV_NAME})
_ENV_MAPPING = _Kind(
    _env_mapping,
    {
        "type": ["object", "null"],
        "propertyNames": {"pattern": _ENV_NAME},
        "additionalProperties": _SCALAR,
    },
)
_ENV_LIST = _Kind(
    _env_list,
    {"type": ["array", "null"], "items": {"type": "string", "pattern": r"^[^=]*[^=\s][^=]*="}},
)
_GPU_IDS = _Kind(_gpu_ids, {"type": "array", "items": _GPU_ID.schema})
_ENGINE_URL = _Kind(_engine_url, {"type": "string", "pattern": r"^https?://[^/?#@]+/?$"})
_PROMETHEUS_URL = _Kind(_prometheus_url, {"type": "string", "pattern": _URL})
_REPLICA_URL = _Kind(_replica_url, {"type": "string", "pattern": _URL})
_REPLICA_URLS = _Kind(_replica_urls, {"type": "array", "items": _REPLICA_URL.schema})
_HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER = re.compile(_HEADER_NAME + r"\Z")
_AFFINITY = _Kind(_affinity, {"type": "string", "pattern": rf"^(?:user|header:{_HEADER_NAME})$"})
_FRACTION = _Kind(
    lambda check, path, value: (
        check.report(path, f"must be at most 1, got {value:g}")
        if (number := _number("a fraction").convert(check, path, value)) is not _INVALID
        and number > 1
        else number
    ),
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


# --- The sections -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SleepPolicy:
    """Policy keys of `sleep_manager`; every one can be overridden per model."""

    idle_threshold_seconds: float = _setting(
        300.0, _SECONDS, "Idle this long (since the last request ended): sleep."
    )
    check_interval_seconds: float = _setting(
        60.0, _POSITIVE_SECONDS, "How often the reconciliation loop looks."
    )
    auto_sleep_enabled: bool = _setting(False, _BOOLEAN, "Put idle models to sleep automatically.")
    wakeup_on_request: bool = _setting(
        True, _BOOLEAN, "A request for a sleeping model wakes it (and is held)."
    )
    min_sleep_duration: float = _setting(
        80.0, _SECONDS, "A model put to sleep stays asleep at least this long."
    )
    wake_timeout_seconds: float = _setting(
        300.0, _POSITIVE_SECONDS, "A held request waits at most this long, then 504."
    )
    max_held_requests: int = _setting(
        1024, _integer(0), "Held requests per model; beyond it: 503 + Retry-After."
    )
    # Bodies of held requests stay in memory until the wake: bound them by size too.
    max_held_bytes: int = _setting(
        256 * 1024 * 1024, _integer(0), "Bytes of held request bodies per model; beyond it: 503."
    )
    min_awake_seconds: float = _setting(
        10.0, _SECONDS, "A model just woken stays awake at least this long."
    )
    drain_timeout_seconds: float = _setting(
        120.0, _SECONDS, "Before sleeping, wait this long for in-flight requests."
    )
    # `adaptive`: kvsleep/adaptive.py, within the two bounds below.
    idle_policy: str = _setting(
        "fixed",
        _choice(*IDLE_POLICIES),
        "fixed: sleep after idle_threshold_seconds; adaptive: learn each model's idle gaps"
        " and pick its threshold (idle_threshold_seconds is then what one wake is worth).",
    )
    min_idle_threshold_seconds: float = _setting(
        30.0, _SECONDS, "Adaptive only: the threshold never goes below this."
    )
    max_idle_threshold_seconds: float = _setting(
        3600.0, _POSITIVE_SECONDS, "Adaptive only: the threshold never goes above this."
    )
    # After a failed sleep, idle sleeps of the model wait this long, doubling with each further
    # failure up to the maximum; a success, a reload or an engine restart starts over.
    sleep_retry_initial_seconds: float = _setting(
        30.0, _SECONDS, "After a failed sleep, idle sleeps wait this long, doubling."
    )
    sleep_retry_max_seconds: float = _setting(
        1800.0, _SECONDS, "The longest wait between sleep attempts after failures."
    )


@dataclass(frozen=True)
class RouterConfig:
    """The router's listener and limits; the admin token is read from the environment so that
    it never sits in a config file (and `repr` leaves it out so it never reaches a log)."""

    host: str = _setting(
        "127.0.0.1", _TEXT, "Address the router listens on.", aliases=("router_host",), restart=True
    )
    port: int = _setting(8080, _PORT, "The router's port.", aliases=("router_port",), restart=True)
    admin_token_env: str | None = _setting(
        None,
        _optional(_ENV_NAME_KIND),
        "Environment variable holding the bearer token for control routes; without one,"
        " they answer loopback clients only.",
    )
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = _setting(
        16 * 1024 * 1024, _integer(1), "Largest request body accepted (bytes)."
    )
    connect_timeout_seconds: float = _setting(5.0, _POSITIVE_SECONDS, "Connecting to an engine.")
    upstream_timeout_seconds: float = _setting(
        600.0, _POSITIVE_SECONDS, "A whole upstream request, streaming included."
    )
    shutdown_grace_seconds: float = _setting(
        30.0, _SECONDS, "On SIGTERM, how long in-flight requests may finish.", restart=True
    )
    listen_backlog: int = _setting(
        1024, _integer(1), "Pending connections the kernel queues.", restart=True
    )
    hold_keepalive_seconds: float = _setting(
        5.0,
        _SECONDS,
        "A streaming request held for a wake gets an SSE comment this often; 0: never.",
    )
    # What one client can cost (kvsleep/connections.py).
    max_client_connections: int = _setting(
        0,
        _integer(0),
        "Open client connections; at the limit a new one replaces the longest-idle one;"
        " 0: from the open-file limit.",
    )
    idle_timeout_seconds: float = _setting(
        75.0, _POSITIVE_SECONDS, "An idle keep-alive connection is closed after this."
    )
    header_timeout_seconds: float = _setting(
        10.0, _POSITIVE_SECONDS, "A request head must arrive within this."
    )
    body_timeout_seconds: float = _setting(
        10.0,
        _POSITIVE_SECONDS,
        "A body must arrive within this plus its size over body_min_bytes_per_second.",
    )
    body_min_bytes_per_second: int = _setting(
        64 * 1024, _integer(1), "The slowest body upload accepted (bytes per second)."
    )
    max_held_bytes: int = _setting(
        1024 * 1024 * 1024,
        _integer(0),
        "Request bodies held for wakes, all models together (bytes).",
    )


@dataclass(frozen=True)
class ModelConfig:
    """One engine, whichever form it came from; `policy` already has its overrides applied,
    so consumers never merge policy themselves."""

    name: str = field(
        metadata=_key(_TEXT, 'What clients put in "model" (unique).', forms=("models",))
    )
    engine: str = field(metadata=_key(_ENGINE, "vllm or sglang."))
    # Required unless `replicas` are given (checked in _parse_models).
    url: str = _setting(
        "",
        _ENGINE_URL,
        "Where the engine listens: http://host:port.",
        forms=("models", "replicas"),
        restart=True,
    )
    policy: SleepPolicy = field(
        default_factory=SleepPolicy,
        metadata={
            "inline": SleepPolicy,
            "note": "Per model (default: the sleep_manager value).",
            "forms": ("models", "instances"),
        },
    )
    sleep_level: int = _setting(
        1,
        _SLEEP_LEVEL,
        "vLLM only: 1 offloads weights to CPU, 2 discards them, 0 only pauses scheduling.",
    )
    always_on: bool = _setting(False, _BOOLEAN, "Never put to sleep.")
    weights_path: str | None = _setting(
        None, _optional(_TEXT), "SGLang: weights to reload after resume (default: the name)."
    )
    command: tuple[str, ...] | None = _setting(
        None,
        _optional(_COMMAND),
        "kvsleep launches and supervises the engine with this command (list or string).",
        forms=("models", "replicas"),
        restart=True,
    )
    engine_args: tuple[str, ...] = _setting(
        (),
        _ENGINE_ARGS,
        "The engine's arguments; its --host/--port say where it listens.",
        aliases=("args",),
        forms=("instances",),
        restart=True,
    )
    env: dict[str, str] = field(
        default_factory=dict,
        metadata=_key(
            _ENV_MAPPING,
            "Extra environment for the launched command.",
            forms=("models", "replicas"),
            restart=True,
        ),
    )
    venv_path: str | None = _setting(
        None,
        _optional(_TEXT),
        "The engine's virtualenv (with using_venv).",
        forms=("instances",),
        restart=True,
    )
    log_file: str | None = _setting(
        None,
        _optional(_TEXT),
        "The launched engine's output (default: under log_dir).",
        forms=("models", "instances", "replicas"),
        restart=True,
    )
    ready_timeout_seconds: float = _setting(
        600.0,
        _POSITIVE_SECONDS,
        "How long a launched engine may take to become ready.",
        restart=True,
    )
    memory_gb: float | None = _setting(
        None,
        _optional(_GB),
        "GPU memory the engine takes when awake.",
        forms=("models", "instances", "replicas"),
    )
    gpus: tuple[int, ...] = _setting(
        (),
        _GPU_IDS,
        "GPU ids it runs on (listed under gpus).",
        forms=("models", "instances", "replicas"),
    )
    wake_eta_seconds: float | None = _setting(
        None,
        _optional(_SECONDS),
        "Expected wake time, for Retry-After and the scaler.",
        forms=("models", "instances", "replicas"),
    )
    engine_flags: str = _setting(
        "auto",
        _choice("auto", "none"),
        "auto: add the sleep flags and env a launched engine lacks; none: run it as given.",
    )
    stop_grace_seconds: float = _setting(
        10.0, _SECONDS, "Stopping the engine: SIGTERM, then SIGKILL after this long."
    )
    scaling: ScalingPolicy | None = field(
        default=None,
        metadata=_key(
            _Kind(lambda check, path, value: _parse_scaling(check, path, value), _ref("scaling")),
            "Warm autoscaling of the model's replicas by sleep and wake (default with replicas:"
            " scale to zero, 8 requests in flight per awake replica).",
            forms=("models",),
        ),
    )
    affinity: str | None = _setting(
        None,
        _optional(_AFFINITY),
        "With replicas: keep a client on one replica (its prefix cache) by the request's"
        " `user` field (user) or a header (header:NAME); default: least outstanding requests.",
        forms=("models",),
    )
    # Set for each engine of a model given `replicas` (the config entry's name is then `model`
    # and each engine's name is `model@replica`); a one-engine model is its own replica "0".
    model: str = ""
    replica: str = "0"

    @property
    def served_name(self) -> str:
        """What clients put in "model": one name for all of a model's replicas."""
        return self.model or self.name

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

    id: int = field(metadata=_key(_GPU_ID, "GPU index, as in CUDA_VISIBLE_DEVICES."))
    memory_gb: float = field(metadata=_key(_GB, "Memory it offers to the models."))


@dataclass(frozen=True)
class PolicySource:
    """Where idle rules read traffic: this process alone, or Prometheus for a fleet of routers."""

    type: str = _setting(
        "local", _choice("local", "prometheus"), "local (this process) or prometheus (fleet-wide)."
    )
    url: str | None = _setting(
        None, _optional(_PROMETHEUS_URL), "Prometheus base URL (required when type is prometheus)."
    )
    query_timeout_seconds: float = _setting(5.0, _POSITIVE_SECONDS, "One Prometheus query.")
    max_staleness_seconds: float = _setting(
        120.0, _SECONDS, "Older Prometheus data counts as unknown."
    )


@dataclass(frozen=True)
class FleetConfig:
    """Other kvsleep replicas in front of the same engines; no peers = this replica alone.

    Each model is owned by one replica (rendezvous hashing over `self_url` and `peers`, so every
    replica computes the same owner): only the owner sleeps and wakes its engine, after every
    peer has drained it; the others ask the owner to wake it.
    """

    self_url: str | None = _setting(
        None, _optional(_REPLICA_URL), "How the peers reach this replica (required with peers)."
    )
    peers: tuple[str, ...] = _setting(
        (), _REPLICA_URLS, "The other replicas' URLs; each model gets one owner."
    )


_POLICY = _section(SleepPolicy)
_ROUTER = _section(
    RouterConfig,
    extra={
        "enable_router": _Key(
            _BOOLEAN, "kvcached's switch for its separately launched router; kvsleep always routes."
        )
    },
)
_SGLANG_HAS_NO_SLEEP_LEVELS = {
    "if": {"properties": {"engine": {"pattern": "^[Ss][Gg][Ll]"}}, "required": ["engine"]},
    "then": {"properties": {"sleep_level": {"const": 1}}},
}
# The `scaling:` keys, one per field of core's ScalingPolicy (whose defaults they take).
_SCALING = _Section(
    {
        "min_awake": _Key(
            _integer(0), "Replicas kept awake whatever the demand; 0: scale to zero when idle."
        ),
        "max_awake": _Key(_optional(_integer(1)), "Most replicas awake at once (default: all)."),
        "target_in_flight": _Key(
            _optional(_number("requests", positive=True)),
            "Requests in flight (held included) one awake replica should carry.",
        ),
        "target_queue": _Key(
            _optional(_number("requests", positive=True)),
            "Requests the engines report waiting, per awake replica.",
        ),
        "target_kv_cache_usage": _Key(
            _optional(_FRACTION), "Mean KV cache usage (0 to 1) of the awake replicas."
        ),
        "scale_up_after_seconds": _Key(
            _SECONDS, "Demand above what the awake replicas carry this long: wake one more."
        ),
        "scale_down_after_seconds": _Key(
            _SECONDS,
            "Demand that fits in one fewer replica this long: drain and sleep one (and no"
            " scale-down sooner than this after a scale-up).",
        ),
        "trend_window_seconds": _Key(
            _SECONDS,
            "Demand this far back sets the trend carried over the wake ETA, so a wake starts"
            " before the awake replicas saturate; 0: off.",
        ),
    },
    (),
    {item.name: item.default for item in dataclasses.fields(ScalingPolicy)},
)
assert _SCALING.keys.keys() == _SCALING.defaults.keys(), "scaling keys and ScalingPolicy differ"
_REPLICA = _section(ModelConfig, form="replicas", required=("url",))
_MODEL = _section(
    ModelConfig,
    form="models",
    extra={
        "replicas": _Key(
            _Kind(_replica_entries, {"type": "array", "minItems": 1, "items": _ref("replica")}),
            "Several engines serving the model, instead of url/command: each is one replica.",
        )
    },
    rules=[
        _SGLANG_HAS_NO_SLEEP_LEVELS,
        {"oneOf": [{"required": ["url"]}, {"required": ["replicas"]}]},
        {
            "if": {"required": ["replicas"]},
            "then": {"not": {"anyOf": [{"required": ["command"]}, {"required": ["env"]}]}},
        },
    ],
)
_INSTANCE = _section(
    ModelConfig,
    form="instances",
    extra={
        "name": _Key(_TEXT, "The instance's own label (clients use model)."),
        "model": _Key(_TEXT, 'The model: what clients put in "model" (unique).'),
        "using_venv": _Key(_BOOLEAN, "Run the engine from venv_path."),
        "kvcached_env": _Key(_ENV_LIST, '"KEY=VALUE" environment, over engine_env.'),
        "engine_env": _Key(_ENV_LIST, '"KEY=VALUE" environment for the engine.'),
    },
    required=("model",),
    rules=[
        _SGLANG_HAS_NO_SLEEP_LEVELS,
        {"anyOf": [{"required": ["engine_args"]}, {"required": ["args"]}]},
        {
            "if": {"properties": {"using_venv": {"const": True}}, "required": ["using_venv"]},
            "then": {"required": ["venv_path"], "properties": {"venv_path": {"type": "string"}}},
        },
    ],
)
_GPU = _section(GpuConfig)
_POLICY_SOURCE = _section(
    PolicySource,
    rules=[
        {
            "if": {"properties": {"type": {"const": "prometheus"}}, "required": ["type"]},
            "then": {"required": ["url"], "properties": {"url": {"type": "string"}}},
        }
    ],
)
_FLEET = _section(
    FleetConfig,
    rules=[
        {
            "if": {"properties": {"peers": {"minItems": 1}}, "required": ["peers"]},
            "then": {"required": ["self_url"], "properties": {"self_url": {"type": "string"}}},
        }
    ],
)


def _parse_router(check: _Checker, path: str, value: object) -> RouterConfig:
    values = check.fields(path, check.mapping(path, value), _ROUTER)
    values.pop("enable_router", None)
    env_name = values.get("admin_token_env")
    if env_name:
        token = os.environ.get(env_name)
        if token:
            values["admin_token"] = token
        else:
            state = "empty" if token == "" else "not set"
            check.missing_secret(
                _join(path, "admin_token_env"), f"environment variable {env_name} is {state}"
            )
    return RouterConfig(**values)


def _parse_scaling(check: _Checker, path: str, value: object) -> ScalingPolicy:
    scaling = ScalingPolicy(**check.fields(path, check.mapping(path, value), _SCALING))
    if scaling.max_awake is not None and scaling.max_awake < scaling.min_awake:
        check.report(
            _join(path, "max_awake"),
            f"must be at least min_awake ({scaling.min_awake}), got {scaling.max_awake}",
        )
    return scaling


def _parse_policy(check: _Checker, path: str, value: object) -> SleepPolicy:
    policy = SleepPolicy(**check.fields(path, check.mapping(path, value), _POLICY))
    _check_bounds(check, path, policy)
    return policy


def _check_bounds(check: _Checker, path: str, policy: SleepPolicy) -> None:
    """The adaptive threshold's bounds must leave it somewhere to be."""
    low, high = policy.min_idle_threshold_seconds, policy.max_idle_threshold_seconds
    if low > high:
        check.report(
            f"{path}.min_idle_threshold_seconds",
            f"must be <= max_idle_threshold_seconds ({high:g}), got {low:g}",
        )


def _parse_gpus(check: _Checker, path: str, value: object) -> tuple[GpuConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        check.wrong_type(path, "a list of {id, memory_gb}", value)
        return ()
    gpus: list[GpuConfig] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if not isinstance(item, dict):
            check.wrong_type(item_path, "a mapping with id and memory_gb", item)
            continue
        values = check.fields(item_path, item, _GPU)
        if len(values) < len(_GPU.required):
            continue
        if any(gpu.id == values["id"] for gpu in gpus):
            check.report(f"{item_path}.id", f"GPU {values['id']} is listed twice")
            continue
        gpus.append(GpuConfig(**values))
    return tuple(gpus)


def _parse_policy_source(check: _Checker, path: str, value: object) -> PolicySource:
    data = check.mapping(path, value)
    values = check.fields(path, data, _POLICY_SOURCE)
    if values.get("type") == "prometheus" and data.get("url") is None:
        check.report(_join(path, "url"), "required when type is prometheus")
    return PolicySource(**values)


def _parse_fleet(check: _Checker, path: str, value: object) -> FleetConfig:
    values = check.fields(path, check.mapping(path, value), _FLEET)
    if values.get("peers") and not values.get("self_url"):
        check.report(
            _join(path, "self_url"),
            "required when fleet.peers is given (the URL peers use to reach this replica)",
        )
    return FleetConfig(**values)


def _entries(check: _Checker, key: str, value: object) -> list[Any]:
    """The list of models (either form); each is then read by `_parse_models`/`_parse_instances`."""
    if value is None or value == []:
        check.report(key, "no models configured")
        return []
    if not isinstance(value, list):
        check.wrong_type(key, "a list of models", value)
        return []
    return value


# --- The whole file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The whole validated file; `source` names it in later messages (reloads, logs).

    The keys' converters are those `_parse_document` calls, in an order of its own: the models
    need the policy and GPUs read before them.
    """

    router: RouterConfig = field(
        default_factory=RouterConfig,
        metadata=_key(
            _Kind(_parse_router, _nullable(_ref("router"))),
            "The OpenAI-compatible router: its listener, timeouts and limits.",
        ),
    )
    sleep_manager: SleepPolicy = field(
        default_factory=SleepPolicy,
        metadata=_key(
            _Kind(_parse_policy, _nullable(_ref("sleep_manager"))),
            "Sleep policy for every model; each key can be overridden per model.",
        ),
    )
    models: tuple[ModelConfig, ...] = _setting(
        (),
        _Kind(_entries, {"type": "array", "minItems": 1, "items": _ref("model")}),
        "The engines kvsleep routes to and puts to sleep (canonical form).",
    )
    gpus: tuple[GpuConfig, ...] = _setting(
        (),
        _Kind(_parse_gpus, _nullable({"type": "array", "items": _ref("gpu")})),
        "Optional memory budgets: the GPUs the models' memory_gb is weighed against.",
    )
    state_dir: str = _setting(
        "./.kvsleep-state", _TEXT, "Where state no engine reveals survives restarts.", restart=True
    )
    log_dir: str = _setting("./.kvsleep-logs", _TEXT, "Logs of launched engines.", restart=True)
    policy_source: PolicySource = field(
        default_factory=PolicySource,
        metadata=_key(
            _Kind(_parse_policy_source, _nullable(_ref("policy_source"))),
            "Where idle rules read traffic from.",
            restart=True,
        ),
    )
    fleet: FleetConfig = field(
        default_factory=FleetConfig,
        metadata=_key(
            _Kind(_parse_fleet, _nullable(_ref("fleet"))),
            "Other kvsleep replicas in front of the same engines.",
            restart=True,
        ),
    )
    # What kvcached's frontend.py does with its config file.
    attach: bool = _setting(
        False,
        _BOOLEAN,
        "Route to engines that already run and launch none (kvsleep serve --attach).",
        restart=True,
    )
    source: str = "<config>"
    warnings: tuple[str, ...] = ()  # what parsing let pass (see parse_config's `secrets`)

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


_TOP = _section(
    Config,
    extra={
        "kvcached": _Key(
            _ENV_MAPPING, "kvcached form: environment for every instance (names upper-cased)."
        ),
        "instances": _Key(
            _Kind(_entries, {"type": "array", "minItems": 1, "items": _ref("instance")}),
            "The engines, in the kvcached controller's form.",
        ),
    },
)
_FORMS = [
    {
        "title": "canonical form",
        "required": ["models"],
        "not": {"anyOf": [{"required": ["instances"]}, {"required": ["kvcached"]}]},
    },
    {"title": "kvcached form", "required": ["instances"], "not": {"required": ["models"]}},
]
# The schema's definitions, by the name the `$ref`s above use.
_DEFS = {
    "router": _ROUTER,
    "sleep_manager": _POLICY,
    "model": _MODEL,
    "replica": _REPLICA,
    "scaling": _SCALING,
    "instance": _INSTANCE,
    "gpu": _GPU,
    "policy_source": _POLICY_SOURCE,
    "fleet": _FLEET,
}


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a config file, so that editors validate as one types.

    It checks each value on its own (types, ranges, key names) and the simpler rules across keys;
    `check-config` remains the authority, with the rest (unique names and ports, GPUs listed,
    the --port inside engine_args, secrets). Only keywords that draft-07 validators also know
    are used, so older editor plugins read it too."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvsleep configuration",
        "description": "kvsleep's config file, canonical (models) or kvcached (instances) form."
        " Durations are seconds. Validate fully with: kvsleep check-config FILE",
        **_section_schema(_TOP),
        "oneOf": _FORMS,
        "$defs": {name: _section_schema(section) for name, section in _DEFS.items()},
    }
    return copy.deepcopy(schema)  # the kinds' schemas are shared, and callers may edit theirs


def _section_schema(section: _Section) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, key in section.keys.items():
        properties[name] = {"description": key.doc, **key.kind.schema}
        if name in section.defaults:
            properties[name]["default"] = section.defaults[name]
        for alias in key.aliases:
            properties[alias] = {"description": f"kvcached's {name}.", **key.kind.schema}
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if section.required:
        schema["required"] = list(section.required)
    one_spelling = [
        {"not": {"required": [name, alias]}} for alias, name in section.aliases().items()
    ]
    if section.rules or one_spelling:
        schema["allOf"] = [*section.rules, *one_spelling]
    return schema


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
        raise ConfigError(
            [
                f"{path}: character {exc.position + 1}: YAML syntax error: "
                f"unacceptable character #x{exc.character:04x}"
            ]
        ) from exc
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


def _restart_keys(cls: type[Any]) -> tuple[str, ...]:
    return tuple(
        item.name
        for item in dataclasses.fields(cls)
        if "key" in item.metadata and item.metadata["key"].restart
    )


# What a running kvsleep cannot change: its listener, its files, its peers, the engines it runs.
_RESTART_ROUTER_KEYS = _restart_keys(RouterConfig)
_RESTART_KEYS = _restart_keys(Config)
_LAUNCH_KEYS = _restart_keys(ModelConfig)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys whose change `new` makes and a reload cannot apply (a reload applies every
    other key, or none)."""
    keys = [
        f"router.{key}"
        for key in _RESTART_ROUTER_KEYS
        if getattr(old.router, key) != getattr(new.router, key)
    ]
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
            keys += [
                f"models[{i}].{key}"
                for key in _LAUNCH_KEYS
                if getattr(was, key) != getattr(model, key)
            ]
    keys += [
        f"models ({name}, a launched engine removed)"
        for name, was in before.items()
        if was.launched
    ]
    return keys


def summary(config: Config) -> str:
    """One line for `check-config`: models per engine, replicas, router address, auto sleep."""
    models = {model.served_name: model for model in config.models}
    engines = Counter(model.engine for model in models.values())
    per_engine = ", ".join(f"{engines[name]} {name}" for name in ENGINES if engines[name])
    count = len(models)
    plural = "" if count == 1 else "s"
    replicas = "" if len(config.models) == count else f", {len(config.models)} engines"
    sleepy = sum(model.policy.auto_sleep_enabled for model in models.values())
    if sleepy == 0:
        auto = "auto sleep off"
    elif sleepy == count:
        auto = "auto sleep on"
    else:
        auto = f"auto sleep on for {sleepy} of {count} models"
    router = f"{_url_host(config.router.host)}:{config.router.port}"
    return f"OK: {count} model{plural} ({per_engine}){replicas}, router on {router}, {auto}"


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
    check.known_keys("", data, _TOP.keys)
    kvcached_form = "instances" in data
    if kvcached_form and "models" in data:
        check.report(
            "models", "give either models (canonical form) or instances (kvcached form), not both"
        )
    if "kvcached" in data and not kvcached_form:
        check.report(
            "kvcached", "sets env vars for kvcached-form instances; with models, use models[].env"
        )

    router = _parse_router(check, "router", data.get("router"))
    policy = _parse_policy(check, "sleep_manager", data.get("sleep_manager"))
    gpus = _parse_gpus(check, "gpus", data.get("gpus"))
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
    served = {entry.model.served_name for entry in entries}
    for path, _, model in entries:
        if model.model and model.name in served:
            check.report(path, f"its engine name {model.name!r} is another model's name")

    dirs = {key: _text(check, key, data[key]) for key in ("state_dir", "log_dir") if key in data}
    attach = _boolean(check, "attach", data.get("attach", False))
    return Config(
        router=router,
        sleep_manager=policy,
        models=tuple(entry.model for entry in entries),
        gpus=gpus,
        policy_source=_parse_policy_source(check, "policy_source", data.get("policy_source")),
        fleet=_parse_fleet(check, "fleet", data.get("fleet")),
        attach=attach is True,
        source=check.source,
        **{key: value for key, value in dirs.items() if value is not _INVALID},
    )


def _parse_models(
    check: _Checker, value: object, policy: SleepPolicy, gpu_ids: set[int] | None
) -> list[_Entry]:
    entries: list[_Entry] = []
    for i, item in enumerate(_entries(check, "models", value)):
        path = f"models[{i}]"
        if not isinstance(item, dict):
            check.wrong_type(path, "a mapping", item)
            continue
        values = check.fields(path, item, _MODEL)
        if "url" not in item and "replicas" not in item:  # one or the other is required
            check.report(f"{path}.url", "missing required key 'url'")
        replicas = values.pop("replicas", None)
        engine_keys = ("url",) if replicas is None else ()
        if not values.keys() >= {*_MODEL.required, *engine_keys}:
            continue
        if replicas is None:
            entries.append(_Entry(path, "url", _finish_model(check, path, values, policy, gpu_ids)))
            continue
        for key in ("url", "command", "env"):
            if key in values:
                check.report(f"{path}.{key}", "give it per replica (under replicas), not here")
        top = values["scaling"].max_awake if "scaling" in values else None
        if top is not None and top > len(replicas):
            check.report(
                f"{path}.scaling.max_awake",
                f"must be at most the {len(replicas)} replicas, got {top}",
            )
        scaling = values.pop("scaling", None) or ScalingPolicy()
        if scaling.min_awake > len(replicas):
            check.report(
                f"{path}.scaling.min_awake",
                f"must be at most the {len(replicas)} replicas, got {scaling.min_awake}",
            )
        name = values["name"]
        for r, raw in enumerate(replicas):
            where = f"{path}.replicas[{r}]"
            if not isinstance(raw, dict):
                check.wrong_type(where, "a mapping", raw)
                continue
            own = check.fields(where, raw, _REPLICA)
            if "url" not in own:
                continue
            engine = {**values, **own, "name": f"{name}@{r}", "model": name, "replica": str(r)}
            model = _finish_model(check, where, engine, policy, gpu_ids)
            entries.append(_Entry(where, "url", dataclasses.replace(model, scaling=scaling)))
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
        values = check.fields(path, item, _INSTANCE)
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
    overrides = {key: values.pop(key) for key in list(values) if key in _POLICY.keys}
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
        dataclasses.replace(model, log_file=maybe(model.log_file), venv_path=maybe(model.venv_path))
        for model in config.models
    )
    return dataclasses.replace(
        config,
        state_dir=resolve(config.state_dir),
        log_dir=resolve(config.log_dir),
        models=models,
    )
