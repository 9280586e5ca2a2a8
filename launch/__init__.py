"""Command line and launch tooling."""
