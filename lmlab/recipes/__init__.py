"""Recipes: whole jobs as library functions (the quickstart, the lineage ladder) that the CLI calls."""
