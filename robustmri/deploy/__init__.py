"""Deployment: file inference (:mod:`.inference`), ONNX export and runtime (:mod:`.onnx`), DICOM series
inference and DICOM SR (:mod:`.dicom`), site calibration from unlabelled images (:mod:`.calibration`)."""
