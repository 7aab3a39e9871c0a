"""A run's life: `trainer.train(cfg)` starts, resumes (`resume`) and stops it (`signals`); the epoch
loop (`loop`), the end of each epoch and of the run (`epoch`), and the state between steps (`state`)."""
