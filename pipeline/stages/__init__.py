"""The stage processes supervisord runs: ingress (MQTT -> rules), worker (a rule's model), egress (results -> MQTT)."""
