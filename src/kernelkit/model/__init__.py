"""The network: timm models with local weights only (`factory`, `weights`), the optimizer and EMA
built for them, and the losses (`losses`). Imports from `core` and `data` (the model's own
preprocessing statistics)."""
