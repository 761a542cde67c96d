"""The `swat` command-line interface (Typer)."""
