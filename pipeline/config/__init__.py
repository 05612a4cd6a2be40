"""The configuration: the YAML file validated (load, schema), the snapshot stages read, `--workers` overrides,
legacy pyboot files converted (pyboot)."""
