"""The benchmark's tables and plots, and the machine description every benchmark records."""
