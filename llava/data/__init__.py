"""Data: the one parquet format every dataset is stored in, ingestion jobs, and readers for training."""
