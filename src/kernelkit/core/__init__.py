"""The ground floor: the typed run config (schema, checks, command line), the run context and its
stop flag, the one clock the budget reads (`clock`, which only tests scale), the Kaggle-or-local
environment switches, atomic file writes, the output-size plan, progress lines, process groups and
the accelerator settings. Everything above may use it; it imports nothing from the other kernelkit
packages, and nothing here imports torch at module level except `distributed` and `accel`, so
options are checked before the slow imports."""
