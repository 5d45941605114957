"""Config to objects: the one place that turns a `Config` into data, loaders, model, optimizer and
loss (`assemble`, `components`), and the timed choice of model and image size (`autopick`).
Imports from every package below it, never from `app`."""
