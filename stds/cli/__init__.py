"""The command line: one-line errors for the entrypoints (`entry`) and the Hydra launcher plugin
that sweeps on one machine (`launcher`)."""
