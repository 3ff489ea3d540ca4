"""The exported model: ONNX export with parity checks (:mod:`.export`), the runtime that loads and runs it
(:mod:`.runtime`), its integrity digest and signature (:mod:`.trust`) and its out-of-distribution
detector (:mod:`.ood`)."""
