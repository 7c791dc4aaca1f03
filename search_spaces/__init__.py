"""Search-space YAML files, shipped as ``lbsearch.search_spaces``."""
