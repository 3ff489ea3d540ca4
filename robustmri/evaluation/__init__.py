"""Evaluation: classification metrics, test reports and the best-validation / last-epoch checkpoints."""
