"""Data handling: volume and landmark IO, preprocessing, the slice cache, folds and the phantom."""
