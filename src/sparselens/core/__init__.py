"""Pure tensor math shared by every capability: one formula, one place."""
