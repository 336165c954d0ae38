"""Bundled sample data for `asymvlm demo`."""
