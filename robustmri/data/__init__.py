"""Data: readers, the data-set catalog, patient-grouped splits, image and label noise, the
embedded synthetic set, the one preprocessing (and the head-based candidate beside it), site shifts
and the site-shift augmentation of training batches, the noisy-data protocol and batching."""
