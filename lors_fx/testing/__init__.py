"""Tiny models and toy batches for tests, tools and the CLI (built from configs, no hub)."""
