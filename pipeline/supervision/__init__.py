"""The stack under supervisord: its programs, `pipeline up`, reloads, and the run directory's layout."""
