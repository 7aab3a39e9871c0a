"""A search over the config (D, alpha, ...) with an Optuna study, one trial per run.

`settings` checks what ``hydra.sweeper`` says; `storage` opens the study and its sampler;
`outcome` reads what a trial's run directory holds; `lock` keeps one search per sweep directory;
`driver` runs the search. The Hydra plugin around it is `stds.cli.sweeper`; see ``docs/search.md``.
"""
