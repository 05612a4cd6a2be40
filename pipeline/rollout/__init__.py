"""Trying a model version on real traffic before it serves: `capture` (the file of the messages a rule received),
`replay` (a capture through one or two model versions in worker processes) and `diff` (what their outputs differ
in). Nothing here runs inside the stack but the capture writer, which the ingress tap uses."""
