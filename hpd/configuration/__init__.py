"""The machinery behind `hpd.config`: the fields' help and checks, the pydantic conversion, keys and
overrides, the checks across sections, and the config written as text.

`hpd.config` holds the sections and the entry points users call (`load_config`, `Config`,
`save_config`, ...); the modules here work on any root config dataclass passed to them, so that none
of them imports `hpd.config` back: `fields.py` (`field_`, the table of every leaf field),
`schema.py` (the pydantic model and its one-line messages), `keys.py` (aliases, `key=value`
overrides, YAML files, building the values), `checks.py` (the rules across sections), `render.py`
(YAML with or without comments, the `hpd train --help` reference).
"""
