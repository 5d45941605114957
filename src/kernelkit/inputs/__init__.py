"""What the competition gives: finding it under /kaggle/input (`discovery`), reading its layout and
labels into a `Competition` (`competition`, over hostile-CSV reading in `csvfiles`), and the
submission's shape: writing it and checking it against sample_submission.csv (`submission`).
Imports only from `core`."""
