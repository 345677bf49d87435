"""Evaluation: held-out digits (the demo), and the benchmark jobs."""
