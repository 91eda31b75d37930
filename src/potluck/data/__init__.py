"""potluck.data."""
