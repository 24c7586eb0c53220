"""Training: one run (`fit`), k-fold cross-validation, and running a checkpoint over a prepared split."""
