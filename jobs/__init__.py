"""Thin entrypoints behind the `llava-ray` subcommands: each parses its arguments, builds its parts from `llava`, runs."""
