"""kernelkit: train a timm model inside a Kaggle time budget and write submission.csv."""
__version__ = "0.1.0"
