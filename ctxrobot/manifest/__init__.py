"""Robot manifests and scenarios: the schema, the bounded YAML loader and FILE:LINE:COL
validation. Callers import from ``schema`` (the loaders and every public name).

- ``schema``: ``load_manifest``, ``load_scenario``, ``with_scenario``, ``check_file``,
  ``validate_file``; re-exports the names below.
- ``yamlload``: reading a file within limits (size, depth, alias expansion, CPU time,
  plain tags) into ruamel containers that know each value's line and column;
  ``envvars``: linear ``${VAR}`` expansion.
- ``scenario``, ``task``, ``document``, ``live``: the pydantic models (``fields``: shared
  types and bounds; ``units``: memory sizes; ``hostpaths``: the mount policy).
- ``messages``: pydantic errors as problems; ``crossref``: checks across sections and
  files; ``problems``: ``Problem``, ``ManifestError``.
- ``defaults``: where the default robot lives, for the command line.

Imports ``ctxrobot.sched.rules`` (the rule language), ``ctxtask.datasets`` (where the data
root is) and third-party libraries; nothing that does I/O beyond reading the manifest's own
files and looking at the host paths it names.
"""
