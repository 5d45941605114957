"""Config to objects: the one place that turns a `Config` into data, loaders, model, optimizer and
loss (`assemble`, `components`), the timed choice of model and image size (`autopick`), and the
choice of input mode (pad, or tiles with squeeze as the autopick's fallback) from the images' aspect
ratios (`input_mode`), and of the augmentation level from how much the images are enlarged
(`augmentation`).
Imports from every package below it, never from `app`."""
