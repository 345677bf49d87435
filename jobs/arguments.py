"""Command-line arguments shared by the jobs that run on Ray and take a config."""

import argparse

from jobs.remote import add_submission_arguments


def add_config_arguments(parser: argparse.ArgumentParser, overrides_example: str) -> None:
    """--config FILE, --address (and the remote submission flags), --s3-endpoint and trailing key=value overrides."""
    parser.add_argument("--config", default=None, help="YAML file with the job's config fields")
    add_submission_arguments(parser)
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL for every s3:// URI")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {overrides_example}")
