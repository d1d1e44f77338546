"""L0 gates (placeholder while the submodules are written)."""
