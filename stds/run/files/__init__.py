"""A run's files: atomic writes (`atomic`), checkpoints (`checkpoint`), the run directory and its
lock (`rundir`), and a saved config rebuilt through the allowlist (`rebuild`)."""
