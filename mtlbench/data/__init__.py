"""Data handling: volume and landmark IO, the cache grid, preprocessing, the slice cache and folds."""
