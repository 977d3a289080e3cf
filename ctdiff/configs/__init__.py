"""The configs that ship with ctdiff (package data): `default.yaml`, the full-size settings, and
`demo.yaml`, the CPU demo. `config/*.yaml` in the source tree are links to these files."""
