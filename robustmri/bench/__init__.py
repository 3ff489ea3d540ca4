"""Benchmarks: the Table 1 engine (:mod:`.benchmark`, :mod:`.profiles`, :mod:`.runs`), its tables, plots and
statistics, the machine description every benchmark records, and synthetic DICOM series for tests and
benchmarks (:mod:`.dicom_fixtures`; never used by the deployed code)."""
