"""Numbers and figures from labels and probabilities: metrics, thresholds, plots (no torch models, no MLflow)."""
