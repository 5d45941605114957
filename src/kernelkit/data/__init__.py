"""Pixels to batches: robust decoding (`images`), the uint8 image cache (`cache`), per-image and
per-batch transforms and TTA views (`transforms`), datasets, loaders and the device feeder
(`loaders`), class-balanced sampling (`sampling`) and folds (`folds`). Imports from `core`."""
