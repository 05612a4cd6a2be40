"""Per-key order and state: a rule's `key:` (which messages belong together), the state a model keeps per key,
and where that state is stored (beside the outbox, committed with each result)."""
