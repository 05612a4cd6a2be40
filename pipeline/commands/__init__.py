"""The `pipeline` command line: the parser and each command (status, models, convert, supervisord-conf, keys, bench)."""
