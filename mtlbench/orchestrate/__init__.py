"""Running many trials: the experiment grid, Ray Tune scheduling, resume, the results store."""
