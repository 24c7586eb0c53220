"""Scoring a trained model on a prepared split: metrics with intervals, plots, embeddings."""
