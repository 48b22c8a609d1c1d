#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests offline: no cluster, no network.

    kubectl kustomize deploy/kubernetes/base | python deploy/validate_manifests.py -

Core objects are checked against the Kubernetes OpenAPI schemas that PyPI's
`kubernetes-validate` ships, strictly (an unknown field is an error), for the oldest and the
newest Kubernetes release the manifests support. Prometheus Operator objects (CRDs, whose schemas
are not shipped) are checked structurally, and the rules embedded in a PrometheusRule go through
`promtool check rules` when promtool is installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MONITORING_GROUP = "monitoring.coreos.com/"


def _where(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def _core(doc: dict[str, Any]) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{_where(doc)}: Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{_where(doc)}: Kubernetes {version} has no {doc.get('kind')}")
    return problems


def _service_monitor(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec") or {}
    problems = []
    if not (spec.get("selector") or {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels is missing")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append("spec.endpoints must be a non-empty list")
    else:
        for i, endpoint in enumerate(endpoints):
            if not isinstance(endpoint, dict) or not (
                endpoint.get("port") or endpoint.get("targetPort")
            ):
                problems.append(f"spec.endpoints[{i}] names no port")
    return [f"{_where(doc)}: {p}" for p in problems]


def _prometheus_rule(doc: dict[str, Any]) -> list[str]:
    groups = (doc.get("spec") or {}).get("groups")
    if not isinstance(groups, list) or not groups:
        return [f"{_where(doc)}: spec.groups must be a non-empty list"]
    problems = []
    for g, group in enumerate(groups):
        if (
            not isinstance(group, dict)
            or not group.get("name")
            or not isinstance(group.get("rules"), list)
        ):
            problems.append(f"spec.groups[{g}] needs a name and a list of rules")
            continue
        for r, rule in enumerate(group["rules"]):
            kinds = [k for k in ("record", "alert") if k in rule]
            if len(kinds) != 1 or not rule.get("expr"):
                problems.append(f"spec.groups[{g}].rules[{r}] needs one of record/alert, and expr")
    return [f"{_where(doc)}: {p}" for p in problems] + _promtool(doc)


def _promtool(doc: dict[str, Any]) -> list[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        print(f"{_where(doc)}: promtool not installed, rules not checked by it", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if result.returncode != 0:
        return [f"{_where(doc)}: promtool check rules: {result.stdout}{result.stderr}".strip()]
    return []


CUSTOM = {"ServiceMonitor": _service_monitor, "PrometheusRule": _prometheus_rule}


def validate(docs: Iterable[Any]) -> list[str]:
    """Every problem found in the documents, one line each; empty when all are valid."""
    problems = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
        elif doc["apiVersion"].startswith(MONITORING_GROUP):
            check = CUSTOM.get(doc["kind"])
            problems += check(doc) if check else [f"{_where(doc)}: unknown custom resource"]
        else:
            problems += _core(doc)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("files", nargs="+", help="rendered manifests (- for stdin)")
    parser.add_argument("--name", help="what to call stdin in messages (default: -)")
    args = parser.parse_args(argv)
    failed = False
    for name in args.files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        label = args.name if name == "-" and args.name else name
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        problems = validate(docs)
        for problem in problems:
            print(f"{label}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
        kinds = ", ".join(sorted({d["kind"] for d in docs if isinstance(d, dict) and "kind" in d}))
        print(f"{label}: {len(docs)} objects ({kinds}): {'INVALID' if problems else 'valid'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
