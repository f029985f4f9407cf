"""Command-line scripts: plotting, data preparation."""
