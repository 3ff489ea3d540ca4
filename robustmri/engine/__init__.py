"""What the bundle's trainers share: the once-after-epoch handler base, the sample-weighted
loss, per-sample predictions, the training history, config files that extend others, the
trained-model metadata written beside checkpoints, and workflows run in process."""
