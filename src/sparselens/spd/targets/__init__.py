"""SPD toy targets."""
