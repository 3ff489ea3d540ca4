"""Deployment: ONNX export and runtime, file inference, DICOM series inference and DICOM SR."""
