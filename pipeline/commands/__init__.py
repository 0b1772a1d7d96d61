"""Commands that are not DVC stages: `translate`, `export_marian`, `summary`."""
