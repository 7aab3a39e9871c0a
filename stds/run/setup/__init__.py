"""Setting a run up: the config schema and its checks (`config`), the run built from its config
(`build`, `optim`), speed settings (`accel`) and the processes it spans (`distributed`)."""
