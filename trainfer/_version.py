"""The package version: one source for the metadata (pyproject reads it), the CLI and bundles."""

__version__ = "0.1.0"
