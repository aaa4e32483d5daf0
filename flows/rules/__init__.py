"""Pure rules: series/view selection, the question bank, validated YAML loading, validation metrics.
No I/O beyond reading their own YAML files; nothing here imports settings or adapters."""
