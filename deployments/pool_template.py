"""A work pool's base job template with some of its variables' defaults replaced.

`deployments/setup.sh image=REGISTRY/ctdiff:TAG volume_claim=my-claim` points the Kubernetes
pools at your image, volume, namespace, ... without editing the JSON templates:

    python -m deployments.pool_template deployments/gpu-job-template.json image=REGISTRY/ctdiff:TAG

prints the template with those defaults. A value is read as JSON when it parses (`gpus=2`,
`node_selector={"pool": "a100"}`, `cpu_limit=null`), else as a string (`image=ctdiff:0.2.0`).
A variable the template does not declare, or a value its schema refuses, is an error.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import jsonschema

EXIT_USAGE = 2


def parse_assignment(text: str) -> tuple[str, object]:
    """`name=value` -> (name, value as JSON if it parses, else the string)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{text!r}: expected VARIABLE=VALUE, e.g. image=registry.example.com/ctdiff:0.1.0")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def with_defaults(template: dict, assignments: list[str]) -> dict:
    """A copy of `template` whose variables default to the assigned values."""
    template = copy.deepcopy(template)
    schema = template["variables"]
    properties = schema["properties"]
    for text in assignments:
        name, value = parse_assignment(text)
        if name not in properties:
            raise ValueError(f"{name}: not a variable of this template; known: {', '.join(sorted(properties))}")
        # Validate against the variable's own schema, with the template's definitions for $refs.
        variable_schema = {**properties[name], "definitions": schema.get("definitions", {})}
        try:
            jsonschema.validate(value, variable_schema)
        except jsonschema.ValidationError as error:
            raise ValueError(f"{name}={json.dumps(value)}: {error.message}") from None
        properties[name]["default"] = value
    return template


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return EXIT_USAGE
    try:
        template = json.loads(Path(args[0]).read_text())
        print(json.dumps(with_defaults(template, args[1:]), indent=2))
    except (OSError, ValueError) as error:
        print(f"pool_template: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
