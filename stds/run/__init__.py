"""The run: a training run built from its config (`config`, `build`, `optim`, `accel`), trained by
the loop (`loop`, its state in `state`), saved and resumed (`checkpoint`, `resume`, `rundir`,
`signals`), spread over processes (`distributed`), measured (`evaluate`, `synops`, `metrics`,
`health`). `stds.run.loop.train(cfg)` is the one function the command line calls."""
