#!/usr/bin/env python3
"""Lint, render and validate the Sluice chart with the real Helm engine, offline.

    charts/check.py [--out DIR] [--render-only]

1. `helm lint` (the Helm v4 SDK embedded in PyPI `helm-python-sdk`) with the default
   values and with values-ha.yaml; any error fails, and so does a warning.
2. Renders the chart (release `sluice`, namespace `sluice-system`) with each values set
   below and writes every set's manifests, CRDs first, to DIR/<set>.yaml.
3. `kubernetes-validate --strict` (the API server's own OpenAPI schemas, unknown fields
   refused) on every rendered object of a built-in kind and on the walk-through's
   manifests in examples/kubernetes/. Objects of other kinds (cert-manager's) are listed,
   not validated: no schema for them ships here.
4. Every RoutePolicy the project shows (examples/policies/, the chart's default
   policies, the walk-through) is checked against the CRD's openAPIV3Schema with a JSON
   Schema validator, and a few broken ones must be refused.

The typed parse of the rendered objects (k8s-openapi, unknown fields refused, the
control plane's flags parsed by its own clap definition, the webhook certificate
checked against its CA bundle) is control-plane/tests/chart.rs, which runs this script
with --render-only.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "sluice"
RELEASE = "sluice"
NAMESPACE = "sluice-system"
# The Kubernetes version the control plane's k8s-openapi types are built for.
KUBE_VERSION = "1.33.0"


def values_sets() -> dict[str, dict]:
    """Values sets rendered and validated: name -> values given to `helm install`."""
    ha = yaml.safe_load((CHART / "values-ha.yaml").read_text())
    return {
        "default": {},
        "ha": ha,
        # The other branches of the templates: policies from the ConfigMap, endpoint
        # discovery beside it, no TokenReview, cert-manager issuing the webhook cert,
        # alert rules as PrometheusRules, the fleet limits' Redis URL Secret for proxies,
        # an admin token Secret of the operator's own, the injected proxies' admin token
        # Secret, a namespace selector with an expression beside its label.
        "dir-certmanager": {
            "policies": {"source": "dir", "extraFiles": {"extra.yaml": EXTRA_POLICY}},
            "discovery": {"endpoints": True},
            "identity": {"tokenReview": False, "bootstrapTokensSecret": "sluice-bootstrap-tokens"},
            "certManager": {"enabled": True},
            "controlPlane": {"podAntiAffinity": "", "adminTokenSecret": "sluice-admin"},
            "dashboards": {"prometheusRules": True},
            "injector": {
                "redisUrlSecret": "sluice-redis",
                "proxyAdminTokenSecret": "sluice-proxy-admin",
                "namespaceSelector": {
                    "matchLabels": {"sluice.dev/inject": "enabled"},
                    "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}],
                },
            },
        },
        # Namespaces selected by two labels: the pod entries must take exactly the
        # namespaces lacking one or both (control-plane/tests/chart.rs checks every case).
        "two-labels": {
            "injector": {"namespaceSelector": {"matchLabels": {"sluice.dev/inject": "enabled", "team": "shop"}}},
        },
        # Tags YAML reads as numbers (a date, a build number): image references must
        # still be `repository:tag`, not a Go format error.
        "numeric-tags": {
            "controlPlane": {"image": {"tag": 123}},
            "injector": {"proxyImage": {"tag": 20261206}},
        },
    }


EXTRA_POLICY = """\
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: extra, namespace: shop }
spec:
  host: extra
  backends:
    extra-v1: { service: extra-v1.shop }
"""

BUILTIN_GROUPS = {
    "",
    "apps",
    "policy",
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
}


def fail(msg: str) -> None:
    print(f"charts/check.py: {msg}", file=sys.stderr)
    sys.exit(1)


def lint() -> None:
    for name, values in [("default", {}), ("ha", values_sets()["ha"])]:
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
        errors = (report.get("errors") or []) + [f"{m['path']}: {m['error']}" for m in bad]
        if errors:
            fail(f"helm lint ({name} values):\n  " + "\n  ".join(errors))
        print(f"helm lint ({name} values): ok")


def render(values: dict) -> list[dict]:
    """The objects `helm install` would create, CRDs first."""
    chart = helm.Chart.load(str(CHART))
    try:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        crds = chart.crds
    finally:
        chart.close()
    objects: list[dict] = []
    for crd in crds:
        objects.extend(d for d in yaml.safe_load_all(crd["data"]) if d)
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        objects.extend(d for d in yaml.safe_load_all(manifests[path]) if d)
    return objects


def notes(values: dict) -> str:
    """NOTES.txt as `helm install` prints it."""
    chart = helm.Chart.load(str(CHART))
    try:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    return "".join(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def write(objects: list[dict], path: pathlib.Path) -> None:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))


def group_of(obj: dict) -> str:
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def kubernetes_validate(files: list[pathlib.Path]) -> None:
    exe = pathlib.Path(sys.executable).with_name("kubernetes-validate")
    cmd = [str(exe) if exe.exists() else "kubernetes-validate", "--strict", "--quiet", "-k", KUBE_VERSION]
    proc = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        fail(f"kubernetes-validate --strict failed:\n{out}")
    print(f"kubernetes-validate --strict -k {KUBE_VERSION}: ok ({', '.join(f.name for f in files)})")


def crd_schema(objects: list[dict]) -> dict:
    for obj in objects:
        if obj.get("kind") == "CustomResourceDefinition" and obj["metadata"]["name"] == "routepolicies.sluice.dev":
            (version,) = [v for v in obj["spec"]["versions"] if v["name"] == "v1alpha1"]
            return to_json_schema(version["schema"]["openAPIV3Schema"])
    fail("the rendered chart has no routepolicies.sluice.dev CRD")
    raise AssertionError


def to_json_schema(node):
    """OpenAPI v3 (as Kubernetes reads it) to JSON Schema: `nullable` admits null, and
    objects refuse fields they do not declare (the API server prunes them, or with
    `kubectl apply`'s default strict field validation refuses them)."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not str(k).startswith("x-kubernetes-")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    # metadata is checked by the API server, not the CRD schema.
    if "metadata" in out.get("properties", {}):
        out["properties"]["metadata"] = {"type": "object"}
    return out


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false), as serde_yaml reads policy files."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def as_kubectl_sends(node):
    """kubectl reads YAML 1.1 and turns keys into strings: an unquoted `on:` key is the
    boolean true and arrives as the field "true"."""
    if isinstance(node, dict):
        return {(str(k).lower() if isinstance(k, bool) else str(k)): as_kubectl_sends(v) for k, v in node.items()}
    if isinstance(node, list):
        return [as_kubectl_sends(v) for v in node]
    return node


def route_policies() -> list[tuple[str, dict]]:
    """Every RoutePolicy document, read as its consumer reads it: policy files as the
    control plane's file source does (YAML 1.2), the walk-through's manifests as kubectl
    does (YAML 1.1)."""
    found = []
    sources = [
        (ROOT.glob("examples/policies/*.yaml"), lambda t: yaml.load_all(t, Loader=Yaml12Loader)),
        (CHART.glob("policies/*.yaml"), lambda t: yaml.load_all(t, Loader=Yaml12Loader)),
        (ROOT.glob("examples/kubernetes/*.yaml"), lambda t: map(as_kubectl_sends, yaml.safe_load_all(t))),
    ]
    for files, load in sources:
        for path in sorted(files):
            for i, doc in enumerate(load(path.read_text())):
                if doc and doc.get("kind") == "RoutePolicy":
                    found.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return found


def check_route_policies(schema: dict) -> None:
    root_schema = dict(schema)
    root_schema.setdefault("properties", {}).update(
        {"apiVersion": {"const": "sluice.dev/v1alpha1"}, "kind": {"const": "RoutePolicy"}, "metadata": {"type": "object"}}
    )
    validator = jsonschema.Draft7Validator(root_schema)
    policies = route_policies()
    if len(policies) < 10:
        fail(f"only {len(policies)} RoutePolicy documents found")
    for where, doc in policies:
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            fail(f"{where} does not match the CRD schema: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    # The check must be able to say no.
    base = policies[0][1]
    broken = {
        "a string where a number goes": ("spec", "routes", 0, "retry", "attempts", "two"),
        "an unknown field": ("spec", "routes", 0, "retries", {"attempts": 2}),
        "an unknown enum value": ("spec", "routes", 0, "retry", "on", ["sometimes"]),
        "a malformed duration": ("spec", "routes", 0, "timeout", "2 seconds"),
    }
    for what, (*path, value) in broken.items():
        doc = copy.deepcopy(base)
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
        node[path[-1]] = value
        if validator.is_valid(doc):
            fail(f"the CRD schema admits {what}: {doc}")
    print(f"RoutePolicy documents against the CRD schema: {len(policies)} ok, {len(broken)} broken ones refused")


def check_default_policies_match_examples() -> None:
    chart = {p.name: p.read_text() for p in CHART.glob("policies/*.yaml")}
    examples = {p.name: p.read_text() for p in ROOT.glob("examples/policies/*.yaml")}
    if chart != examples:
        diff = sorted(set(chart) ^ set(examples)) + sorted(n for n in chart.keys() & examples.keys() if chart[n] != examples[n])
        fail(f"charts/sluice/policies/ differs from examples/policies/ ({', '.join(diff)}); copy them over")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, help="where the rendered manifests go (default: a temporary folder)")
    parser.add_argument("--render-only", action="store_true", help="render and write the manifests, nothing else")
    args = parser.parse_args()
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="sluice-chart-"))
    out.mkdir(parents=True, exist_ok=True)

    rendered = {}
    for name, values in values_sets().items():
        try:
            objects = render(values)
        except helm.HelmError as e:
            fail(f"rendering with {name} values: {e}")
        rendered[name] = objects
        text = yaml.safe_dump_all(objects)
        if "%!" in text:
            line = next(l for l in text.splitlines() if "%!" in l)
            fail(f"rendering with {name} values: a Go format error in the output: {line.strip()}")
        if name == "numeric-tags":
            for image in ["sluice-control-plane:123", "sluice-proxy:20261206"]:
                if image not in text:
                    fail(f"rendering with {name} values: no image {image} (a numeric tag rendered otherwise)")
        write(objects, out / f"{name}.yaml")
        print(f"rendered {name}: {len(objects)} objects -> {out / (name + '.yaml')}")
    if args.render_only:
        return

    # Values that cannot work are refused at install, with why.
    for name, values, why in [
        (
            "no way to certify",
            {"identity": {"tokenReview": False}},
            "no injected pod would become ready",
        ),
    ]:
        try:
            render(values)
        except helm.HelmError as e:
            if why not in str(e):
                fail(f"rendering with {name} values: refused, but not saying {why!r}: {e}")
        else:
            fail(f"rendering with {name} values: accepted, but it cannot work ({why})")

    # NOTES.txt says how to open an injected proxy's admin port, with the token Secret
    # the injector mounts or, without one, how to set it.
    for values, want in [
        ({}, "injector.proxyAdminTokenSecret=sluice-proxy-admin"),
        (
            {"injector": {"proxyAdminTokenSecret": "shop-admin"}},
            'kubectl -n shop create secret generic shop-admin --from-literal=token="$(cat proxy-admin.token)"',
        ),
    ]:
        if want not in notes(values):
            fail(f"NOTES.txt with {values} does not say {want!r}:\n{notes(values)}")

    lint()
    check_default_policies_match_examples()
    files = []
    for name, objects in rendered.items():
        builtin = [o for o in objects if group_of(o) in BUILTIN_GROUPS]
        other = [f"{o['kind']} {o['metadata']['name']}" for o in objects if group_of(o) not in BUILTIN_GROUPS]
        path = out / f"{name}.builtin.yaml"
        write(builtin, path)
        files.append(path)
        if other:
            print(f"{name}: not schema-checked (no schema here): {', '.join(other)}")
    files.extend(sorted(p for p in ROOT.glob("examples/kubernetes/*.yaml") if not only_route_policies(p)))
    kubernetes_validate(files)
    check_route_policies(crd_schema(rendered["default"]))
    print("chart checks: ok")


def only_route_policies(path: pathlib.Path) -> bool:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return all(d.get("kind") == "RoutePolicy" for d in docs)


if __name__ == "__main__":
    main()
