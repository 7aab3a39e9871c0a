"""A run's measurements: evaluation (`evaluate`), metrics and their writer (`metrics`), SynOps and
firing rates (`synops`), and the warnings read off the figures (`health`)."""
