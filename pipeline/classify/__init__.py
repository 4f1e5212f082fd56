"""Stage 2: classify a slice, its tumor crop, or its masked tumor region."""
