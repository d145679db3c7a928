"""The Helm chart (deploy/helm/coderepair), checked without `helm`, which cannot be
installed here (not in Debian; PyPI's `helm` is an unrelated system monitor).

The equivalent of `helm lint`: values.yaml validates against values.schema.json, and
every template renders with the default values into YAML manifests whose kinds and
required fields are checked. The templates are kept to a small subset of Go templates
(field lookups, `define`/`include`, `if`/`end`, and the functions `quote`, `toYaml`,
`nindent`), which `render` below implements exactly as Go/Sprig do for these cases; any
construct outside the subset raises `TemplateError` rather than being guessed at.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.config import load_config
from coderepair.protocol.errors import ProtocolError
from coderepair.trainer.config import load_run_config

CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "coderepair"
RELEASE = {"Name": "demo", "Namespace": "coderepair", "Service": "Helm"}


class TemplateError(ProtocolError):
    """A template uses something outside the rendered subset, or names a missing value."""


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with the `{{-`/`-}}` whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(text):
        chunk = text[pos : match.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if match.group(1):
            chunk = chunk.rstrip()
        out.append(("text", chunk))
        out.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        pos = match.end()
    rest = text[pos:]
    out.append(("text", rest.lstrip() if trim_next else rest))
    if "{{" in "".join(s for kind, s in out if kind == "text"):
        raise TemplateError("unbalanced '{{' in template")
    return out


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    value: Any = scope
    for part in path.lstrip(".").split("."):
        if not isinstance(value, dict) or part not in value:
            raise TemplateError(f"{path} is not set (helm would render '<no value>')")
        value = value[part]
    return value


def _to_yaml(value: Any) -> str:
    # Helm's toYaml: sigs.k8s.io/yaml (sorted keys, block style), trailing newline cut.
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False).rstrip("\n")


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + text.replace("\n", "\n" + pad)


_FUNCS: dict[str, Callable[..., str]] = {
    "quote": lambda value: json.dumps(str(value)),
    "toYaml": _to_yaml,
    "nindent": lambda width, text: "\n" + _indent(int(width), text),
}


class _Renderer:
    def __init__(self, defines: dict[str, list[tuple[str, str]]], scope: dict[str, Any]):
        self.defines = defines
        self.scope = scope

    def _atom(self, word: str) -> Any:
        if word.startswith('"') and word.endswith('"') and len(word) >= 2:
            return word[1:-1]
        if word.isdigit():
            return int(word)
        if word.startswith("."):
            return _lookup(word, self.scope)
        raise TemplateError(f"unsupported operand {word!r}")

    def _command(self, words: list[str], piped: list[Any]) -> Any:
        head, args = words[0], words[1:]
        if head == "include":
            if len(args) != 2 or args[1] != "." or piped:
                raise TemplateError('only `include "name" .` is supported')
            name = self._atom(args[0])
            if name not in self.defines:
                raise TemplateError(f"include of undefined template {name!r}")
            return self.run(self.defines[name])
        if head in _FUNCS:
            return _FUNCS[head](*[self._atom(a) for a in args], *piped)
        if args or piped:
            raise TemplateError(f"unsupported function {head!r}")
        return self._atom(head)

    def evaluate(self, pipeline: str) -> Any:
        piped: list[Any] = []  # the previous stage's result is the last argument
        for stage in pipeline.split("|"):
            words = stage.split()
            if not words:
                raise TemplateError(f"empty pipeline stage in {pipeline!r}")
            piped = [self._command(words, piped)]
        return piped[0]

    def run(self, tokens: list[tuple[str, str]]) -> str:
        out: list[str] = []
        stack: list[bool] = []  # one entry per open `if`: is its branch rendered?
        for kind, body in tokens:
            live = all(stack)
            if kind == "text":
                out.append(body if live else "")
            elif body.startswith("/*") and body.endswith("*/"):
                continue
            elif body.startswith("if "):
                stack.append(bool(self.evaluate(body[3:])) if live else False)
            elif body == "end":
                if not stack:
                    raise TemplateError("`end` without `if`")
                stack.pop()
            elif live:
                value = self.evaluate(body)
                if isinstance(value, (dict, list)):
                    raise TemplateError(f"{body!r} prints a map or list: pipe it to toYaml")
                out.append(str(value).lower() if isinstance(value, bool) else str(value))
        if stack:
            raise TemplateError("`if` without `end`")
        return "".join(out)


def _split_defines(text: str) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    body: list[tuple[str, str]] = []
    defines: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for kind, value in _tokens(text):
        if kind == "action" and value.startswith("define "):
            name = value[len("define ") :].strip()
            if not (name.startswith('"') and name.endswith('"')) or current is not None:
                raise TemplateError(f"bad define {value!r}")
            current = defines.setdefault(name[1:-1], [])
        elif kind == "action" and value == "end" and current is not None:
            # Nested `if` inside a define would need a depth count; the chart has none.
            current = None
        else:
            (body if current is None else current).append((kind, value))
    if current is not None:
        raise TemplateError("`define` without `end`")
    return body, defines


def render_chart(chart: Path, values: dict[str, Any]) -> dict[str, str]:
    """{template file name: rendered text} for every templates/*.yaml of the chart."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    chart_scope = {"Name": meta["name"], "Version": meta["version"]}
    chart_scope["AppVersion"] = meta["appVersion"]
    scope = {"Values": values, "Release": RELEASE, "Chart": chart_scope}
    defines: dict[str, list[tuple[str, str]]] = {}
    for helper in sorted((chart / "templates").glob("*.tpl")):
        rest, found = _split_defines(helper.read_text())
        if "".join(v for k, v in rest if k == "text").strip():
            raise TemplateError(f"{helper.name} has output outside define blocks")
        defines.update(found)
    return {
        path.name: _Renderer(defines, scope).run(_tokens(path.read_text()))
        for path in sorted((chart / "templates").glob("*.yaml"))
    }


# ------------------------------------------------------------------ the renderer


def _render_text(text: str, values: dict[str, Any]) -> str:
    scope = {"Values": values, "Release": RELEASE, "Chart": {}}
    return _Renderer({}, scope).run(_tokens(text))


def test_renderer_follows_go_template_trimming_and_functions() -> None:
    values = {"a": {"b": "x"}, "on": True, "off": False, "m": {"k": 1, "j": [1, 2]}}
    assert _render_text("p: {{ .Values.a.b }}", values) == "p: x"
    assert _render_text("a\n  {{- .Values.a.b | quote }}  \n{{- .Release.Name }}", values) == (
        'a"x"demo'
    )
    assert _render_text(
        "{{ if .Values.off }}no{{ end }}{{ if .Values.on }}yes{{ end }}", values
    ) == ("yes")
    assert _render_text("m:{{- toYaml .Values.m | nindent 2 }}", values) == (
        "m:\n  j:\n  - 1\n  - 2\n  k: 1"
    )


@pytest.mark.parametrize(
    "text",
    [
        "{{ .Values.missing }}",
        "{{ default .Values.a.b }}",
        "{{ range .Values.m }}{{ end }}",
        "{{ if .Values.on }}",
        "{{ end }}",
        "{{ .Values.m }}",
        '{{ include "nope" . }}',
        "{{ .Values.a.b ",
    ],
)
def test_renderer_refuses_what_it_does_not_render(text: str) -> None:
    with pytest.raises(TemplateError):
        _render_text(text, {"a": {"b": "x"}, "on": True, "m": {}})


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}-. |"abif end' + "\n", max_size=60))
def test_renderer_gives_text_or_a_template_error(text: str) -> None:
    try:
        result = _render_text(text, {"a": {"b": "x"}})
    except TemplateError:
        return
    assert isinstance(result, str)


# ------------------------------------------------------------------ the chart


def _values() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


def _manifests(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, text in render_chart(CHART, values).items():
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: apiVersion/kind"
            assert doc["metadata"]["name"].startswith("demo-coderepair"), name
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_chart_metadata_is_helm_v2() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


def test_values_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(_values())


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("coordinator", "replicas"), 0),
        (("coordinator", "grpcPort"), 70000),
        (("secrets", "database", "name"), "Not_A_Name"),
        (("trainer", "enabled"), "yes"),
        (("validator", "unknown"), 1),
    ],
)
def test_schema_refuses_bad_values(path: tuple[str, ...], bad: object) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = _values()
    target = values
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(values)


def test_chart_renders_the_production_layout() -> None:
    kinds = sorted(key.split("/")[0] for key in _manifests(_values()))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Job",
        "PersistentVolumeClaim",
        "Service",
    ]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def test_every_container_has_image_args_resources_and_a_locked_down_context() -> None:
    values = _values()
    for key, doc in _manifests(values).items():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, key
        for container in _containers(doc):
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", container["image"]), key
            assert container["args"] and all(isinstance(a, str) for a in container["args"])
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, key
            assert context["capabilities"]["drop"] == ["ALL"], key
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), key


def test_coordinator_probes_healthz_on_the_dashboard_port_of_its_config() -> None:
    values = _values()
    manifests = _manifests(values)
    deployment = manifests["Deployment/demo-coderepair-coordinator"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = tomllib.loads(values["coordinator"]["config"])
    assert ports["dashboard"] == config["dashboard"]["port"]
    assert ports["grpc"] == int(config["server"]["listen"].rsplit(":", 1)[1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "dashboard"}
    service = manifests["Service/demo-coderepair-coordinator"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]


def test_secrets_are_referenced_never_inlined() -> None:
    values = _values()
    manifests = _manifests(values)
    assert not [k for k in manifests if k.startswith("Secret/")]
    coordinator = manifests["Deployment/demo-coderepair-coordinator"]
    env = {e["name"]: e for e in coordinator["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("CODEREPAIR_COORDINATOR_DATABASE__URL", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"]
    job = manifests["Job/demo-coderepair-trainer"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["trainer-key-secret"]["secret"]["secretName"] == "coderepair-trainer-key"
    assert "BEGIN" not in json.dumps(manifests)


def test_configmap_carries_configs_the_real_loaders_accept(tmp_path: Path) -> None:
    config_map = _manifests(_values())["ConfigMap/demo-coderepair-config"]
    (tmp_path / "coordinator.toml").write_text(config_map["data"]["coordinator.toml"])
    (tmp_path / "run.toml").write_text(config_map["data"]["run.toml"])
    coordinator = load_config(tmp_path / "coordinator.toml")
    assert coordinator.audit.in_process is False and coordinator.object_store.kind == "s3"
    trainer = load_run_config(tmp_path / "run.toml")
    assert str(trainer.key_file) == "/var/run/coderepair/keys/trainer.pem"


def test_trainer_and_validator_can_be_switched_off() -> None:
    values = _values()
    values["trainer"]["enabled"] = False
    values["validator"]["enabled"] = False
    kinds = sorted(key.split("/")[0] for key in _manifests(values))
    assert kinds == ["ConfigMap", "Deployment", "Service"]
