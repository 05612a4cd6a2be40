"""Models: loading a model folder, encoding results, message filters, and model packages (download, verify, cache)."""
