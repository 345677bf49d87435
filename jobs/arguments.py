"""Command-line arguments shared by the jobs that run on Ray and take a config."""

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, overrides_example: str) -> None:
    """--config FILE, --address, --s3-endpoint and trailing key=value overrides."""
    parser.add_argument("--config", default=None, help="YAML file with the job's config fields")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL for every s3:// URI")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {overrides_example}")
