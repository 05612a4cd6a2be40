"""The configuration schema, in sections; `pipeline.config` assembles and loads it."""
