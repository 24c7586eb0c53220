"""Hyperparameter search: the Optuna study over `fit`, its search space and storage, and ensembles of its trials."""
