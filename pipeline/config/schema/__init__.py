"""The configuration schema, in sections; `pipeline.config.load` assembles and loads it."""
