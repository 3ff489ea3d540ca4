"""Data: readers, the data-set catalog, patient-grouped splits, image and label noise, the
embedded synthetic set, the one preprocessing, the noisy-data protocol and batching."""
