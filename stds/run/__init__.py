"""The run: set up from its config (`stds.run.setup`), lived (`stds.run.life`: start, the epoch loop,
resume, stop), kept in files (`stds.run.files`) and measured (`stds.run.measure`).
`stds.run.life.trainer.train(cfg)` is the one function the command line calls."""
