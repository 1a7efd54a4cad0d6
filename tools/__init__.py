"""Repository tools (not installed): the import-graph check and figure."""
