"""What a user reads first: ``launch/train.py --help`` (conf/hydra/help/stds.yaml), and presets
whose schedules follow ``epochs``."""

from __future__ import annotations

import re

import pytest

from tests.conftest import CONF, REPO, compose_train, run_train


@pytest.fixture(scope="module")
def help_text() -> str:
    proc = run_train("--help")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _section(text: str, title: str) -> str:
    """The lines of ``== title ==`` up to the next section."""
    start = text.index(f"== {title}")
    end = text.find("\n== ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_help_explains_the_main_keys(help_text):
    keys = _section(help_text, "Main keys")
    for line_start, words in [
        ("flat_width=D", ("final threshold", "Grad R: the constant threshold mu")),
        ("alpha_gr=A", ("Grad R prior", "0 = off")),
        ("target_sparsity=S", ("scheduler=target", "sparsity")),
        ("T=N", ("time steps",)),
        ("amp=M", ("false, fp16", "true = fp16", "bf16")),
    ]:
        line = next(l for l in keys.splitlines() if l.startswith(line_start))
        following = keys[keys.index(line):]
        assert all(word in following[:300] for word in words), (line_start, following[:300])


def test_help_names_every_preset_and_launcher_that_exists(help_text):
    presets = _section(help_text, "Presets")
    files = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert "cifar10_gradr" in presets
    assert all(re.search(rf"\b{name}\b", presets) for name in files), files
    launchers = _section(help_text, "Launchers")
    ours = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
    for name in [*ours, "submitit_local"]:
        assert re.search(rf"^{name} ", launchers, re.MULTILINE), name
    # Hydra's own list of groups and options is filled in, and the whole config is not dumped
    assert "experiment: cifar10_dense, " in help_text and "_target_" not in help_text
    assert len(help_text.splitlines()) <= 60  # one screen


def test_help_is_the_selected_hydra_help():
    cfg = compose_train(hydra=True)
    assert cfg.hydra.help.app_name == "stds"
    assert "$APP_CONFIG_GROUPS" in cfg.hydra.help.template


@pytest.mark.parametrize("epochs", [3, 320])
def test_imagenet_dense_cosine_decays_over_the_epochs_asked_for(epochs):
    cfg = compose_train("experiment=imagenet_dense", f"epochs={epochs}")
    assert cfg.lr_scheduler._target_.endswith("CosineAnnealingLR")
    assert cfg.lr_scheduler.T_max == epochs
    assert compose_train("experiment=imagenet_dense").lr_scheduler.T_max == 320  # the paper's


def test_help_names_every_search_preset(help_text):
    searches = _section(help_text, "Searches")
    for name in sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")):
        assert re.search(rf"^{name} ", searches, re.MULTILINE), name


QUICK_TRY = "python launch/train.py epochs=2 flat_width=0.05"


def test_help_names_resume_init_from_compile_and_the_other_entrypoints(help_text):
    keys = _section(help_text, "Main keys")
    for key, words in [("compile=true", "torch.compile"), ("resume=DIR|last", "stopped run"),
                       ("init_from=CKPT", "new run from trained weights")]:
        line = next(l for l in keys.splitlines() if l.startswith(key))
        assert words in line, line
    assert "python launch/report.py DIR" in help_text and "python launch/export.py RUN_DIR" in help_text
    assert "under 3 minutes" in help_text and "a few minutes" not in help_text


def test_help_and_readme_show_the_same_quick_try(help_text):
    readme = (REPO / "README.md").read_text()
    assert f"Quick try: {QUICK_TRY} " in help_text
    assert f"`{QUICK_TRY}`" in readme
    assert "< 3 min" in readme and "under 3 minutes" in help_text  # the same promise


def test_readme_says_how_to_get_the_cpu_only_build_and_keeps_the_ci_line():
    lines = (REPO / "README.md").read_text().splitlines()
    cpu = [l for l in lines if "--index-url https://download.pytorch.org/whl/cpu" in l]
    assert len(cpu) == 1 and cpu[0].startswith("pip install torch==2.14.1 torchvision==0.29.1 --index-url")
    assert any(l.startswith("pip install torch==2.14.1 torchvision==0.29.1   # the line CI uses") for l in lines)


@pytest.mark.slow
def test_the_quick_try_learns_and_prunes_without_a_warning(tmp_path):
    # the documented quick try, in process: 2 epochs of 44 steps
    import json

    from stds.run.life.trainer import train

    overrides = QUICK_TRY.split()[2:]
    train(compose_train(*overrides, "logging.synops=false"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_acc1"] > 0.9 and 0.3 < metrics["sparsity"] < 0.99  # 0.9833 at 0.6582 measured
    assert metrics["warnings"] == []
