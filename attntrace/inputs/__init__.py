"""Inputs: YAML with line marks, array sources, the typed spec, expectations, and the files a
run reads and writes."""
