"""Validates every Kubernetes manifest of a directory offline, strictly (unknown fields are
errors), and prints one JSON line per resource: {"file", "kind", "name", "schema"}.

Built-in kinds are checked by kubernetes-validate (PyPI; it ships the Kubernetes JSON
schemas). Custom resources (the Prometheus Operator's ServiceMonitor) are checked against the
openAPIV3Schema of their CustomResourceDefinition, vendored in the directory's schemas/
folder, made strict the way `kubectl apply --validate=strict` is: a property that the schema
does not list is an error unless the schema keeps unknown fields.

Usage: validate_k8s.py DIR [KUBERNETES_VERSION]   (exit 1 and the reasons on stderr on failure)
Run by tests/it/kubernetes.rs.
"""

import copy
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml


def strict(schema):
    """A copy of an OpenAPI v3 schema that refuses properties it does not list."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if not isinstance(s, dict):
            return
        if (
            "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for sub in s.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            walk(s.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)

    walk(schema)
    # apiVersion, kind and metadata are the API server's, on every object.
    schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return schema


def crd_schemas(directory):
    """(group, version, kind) -> strict schema, from the CRDs under DIR/schemas."""
    out = {}
    for path in sorted((directory / "schemas").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                schema = v["schema"]["openAPIV3Schema"]
                out[(spec["group"], v["name"], spec["names"]["kind"])] = strict(schema)
    return out


def check(doc, crds, version):
    """The schema that validated `doc`; raises on any error."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return "kubernetes " + version
    except kubernetes_validate.SchemaNotFoundError:
        pass
    group, _, v = doc["apiVersion"].rpartition("/")
    schema = crds.get((group, v, doc["kind"]))
    if schema is None:
        raise ValueError(f"no schema for {doc['apiVersion']} {doc['kind']}: vendor its CRD in schemas/")
    jsonschema.Draft202012Validator(schema).validate(doc)
    if not doc.get("metadata", {}).get("name"):
        raise ValueError("metadata.name is missing")
    return "CRD " + doc["apiVersion"]


def main():
    directory = pathlib.Path(sys.argv[1])
    version = sys.argv[2] if len(sys.argv) > 2 else "1.37"
    crds = crd_schemas(directory)
    failed = False
    files = sorted(directory.glob("*.yaml")) + sorted((directory / "schemas").glob("*.yaml"))
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = doc.get("metadata", {}).get("name", "?")
            try:
                schema = check(doc, crds, version)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                where = "/".join(str(p) for p in e.absolute_path)
                print(f"{path.name}: {doc.get('kind')}/{name}: {where}: {e.message}", file=sys.stderr)
                failed = True
                continue
            except Exception as e:  # a missing schema, a malformed document
                print(f"{path.name}: {doc.get('kind')}/{name}: {e}", file=sys.stderr)
                failed = True
                continue
            print(json.dumps({"file": path.name, "kind": doc["kind"], "name": name, "schema": schema}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
