"""Batch inference on Ray Data (questions -> answers), used by the evaluation jobs and the demo."""
