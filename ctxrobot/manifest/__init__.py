"""Robot manifests and scenarios: the schema, the safe YAML loader and FILE:LINE:COL
validation. Imports `model` and `sched` (the rule language); never anything that does I/O
beyond reading the manifest's own files.
"""
