"""potluck.core."""
