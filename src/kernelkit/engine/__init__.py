"""Training and prediction under the wall clock: the budget clock and inference reserve (`budget`),
the plan (`plan`), progressive resizing (`resolution`), the training loop and the checkpoint
format it saves and restores (`trainer`, `TrainState`), the prediction and validation loop
(`evaluate`), weight averaging (`swa`), the not-learning check (`learning_check`), checkpoint files:
names, atomic background writes, format versions (`checkpoint`), resuming (`resume`) and the
run_state.json of a run spread over sessions (`run_state`). Takes explicit objects, never the
config's wiring; imports from `core`, `inputs`, `data`, `model` and `decide`."""
