"""The training engine: network, augmentation, metrics, resampling, training and evaluation of one trial."""
