"""Pattern families: one file per family (search functions + replacement + guard)."""
