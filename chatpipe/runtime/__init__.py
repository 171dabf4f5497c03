"""The shared runtime every service stands on: settings (`config`), the grammar of setting values
(`specs`), metric definitions (`metric_defs`), the health and metrics HTTP app (`serve`), Kafka client
settings (`kafka`), topic names (`topics`) and the fenced patches of third-party internals (`patches`).

It sits below `ingest`, `processors` and `sinks` and imports none of them (import-linter checks it:
`.importlinter`); only `schemas` lies below it.
"""
