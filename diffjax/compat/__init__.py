"""Migration and parity façades that speak the original projects' vocabulary."""
