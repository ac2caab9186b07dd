"""Config loading: every class of error names its key, profiles merge, overrides parse to the key's type."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mtlbench.assemble import resolve_plugins
from mtlbench.config import check_trainable, expand_grid, load_config, parse_value, to_toml, validate_config
from mtlbench.errors import ConfigError

BASE = """
[experiment]
name = "t"
folds = 3

[train]
epochs = 4
batch_size = 2

[tasks.segmentation]
[tasks.landmarks]
params = { loss = "rmse" }

[strategies.single]
[strategies.joint]
grid = { "weights.landmarks" = [1, 3] }

[profiles.small]
train = { epochs = 1 }
preprocess = { slice_size = [64, 64] }

[profiles.small.model]
widths = [8, 16]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "b.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_follow_the_protocol():
    cfg = validate_config({})
    assert cfg.preprocess.clamp == (-1024.0, 1024.0) and cfg.preprocess.scale == 500
    assert cfg.preprocess.slice_size == (256, 256)
    assert cfg.model.widths == [64, 128, 256, 512, 1024]
    assert cfg.train.lr == 1e-4 and cfg.train.lr_decay_epoch == 10 and cfg.train.epochs == 50
    assert cfg.augment.rotation_deg == (-10, 10) and cfg.augment.scale == (0.9, 1.1)
    assert cfg.experiment.folds == 5


def test_misspelt_key_names_key_and_suggestion(tmp_path):
    p = write(tmp_path, BASE.replace("batch_size = 2", "batch_sise = 2"))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "train.batch_sise" in msg and "did you mean 'train.batch_size'" in msg
    assert str(p) in msg and "\n" not in msg


def test_misspelt_section(tmp_path):
    p = write(tmp_path, BASE + "\n[trian]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, BASE.replace("epochs = 4", 'epochs = "many"'))
    with pytest.raises(ConfigError, match=r"train\.epochs: .*integer"):
        load_config(p)


def test_out_of_range_names_key(tmp_path):
    p = write(tmp_path, BASE.replace("folds = 3", "folds = 1"))
    with pytest.raises(ConfigError, match=r"experiment\.folds: .*greater than or equal to 2"):
        load_config(p)


def test_invalid_toml_is_one_line(tmp_path):
    p = write(tmp_path, "[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/b.toml")


def test_profile_deep_merges(tmp_path):
    cfg = load_config(write(tmp_path, BASE), profile="small")
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 2  # merged, not replaced
    assert cfg.preprocess.slice_size == (64, 64) and cfg.model.widths == [8, 16]
    assert cfg.profile == "small"


def test_unknown_profile_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown profile 'smal' \(did you mean 'small'\?\)"):
        load_config(write(tmp_path, BASE), profile="smal")


def test_set_overrides_parse_to_type(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        sets=["train.epochs=7", "train.lr=0.01", "augment.enabled=false", "data.organs=[\"liver\"]",
              "data.source=manifest", "experiment.seeds=[1, 2]"],
    )
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.01 and cfg.augment.enabled is False
    assert cfg.data.organs == ["liver"] and cfg.data.source == "manifest"
    assert cfg.experiment.seeds == [1, 2]


def test_set_after_profile_wins(tmp_path):
    cfg = load_config(write(tmp_path, BASE), profile="small", sets=["train.epochs=9"])
    assert cfg.train.epochs == 9


def test_set_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, BASE), sets=["train.epochs"])
    with pytest.raises(ConfigError, match=r"train\.epohcs.*did you mean 'train\.epochs'"):
        load_config(write(tmp_path, BASE), sets=["train.epohcs=3"])
    with pytest.raises(ConfigError, match=r"train\.epochs: .*integer"):
        load_config(write(tmp_path, BASE), sets=["train.epochs=abc"])


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="main_task 'segmentation' is not one of tasks"):
        validate_config({"tasks": {"landmarks": {}}})
    with pytest.raises(ConfigError, match="clamp"):
        validate_config({"preprocess": {"clamp": [10, -10]}})


def test_plugin_names_and_params_are_checked(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    resolve_plugins(cfg, source="b.toml")  # the built-ins accept it
    bad = load_config(write(tmp_path, BASE), sets=["strategies.jiont.enabled=true"])
    with pytest.raises(ConfigError, match=r"strategies\.jiont: unknown strategy 'jiont' \(did you mean 'joint'\?\)"):
        resolve_plugins(bad, source="b.toml")
    bad = load_config(write(tmp_path, BASE), sets=["tasks.landmarks.params.los=\"mse\""])
    with pytest.raises(ConfigError, match=r"tasks\.landmarks\.params\.los.*did you mean 'tasks\.landmarks\.params\.loss'"):
        resolve_plugins(bad, source="b.toml")
    bad = load_config(write(tmp_path, BASE), sets=["data.phantom.patients=0"])
    with pytest.raises(ConfigError, match=r"data\.phantom\.patients"):
        resolve_plugins(bad, source="b.toml")
    bad = load_config(write(tmp_path, BASE), sets=["data.phantm.patients=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'data\.phantm' \(did you mean 'data\.phantom'\?\)"):
        resolve_plugins(bad, source="b.toml")
    bad = load_config(write(tmp_path, BASE), sets=["strategies.joint.train.epoch=3"])
    with pytest.raises(ConfigError, match=r"strategies\.joint\.train\.epoch"):
        resolve_plugins(bad, source="b.toml")


def test_expand_grid(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    points = expand_grid(cfg.strategies["joint"])
    assert points == [{"weights": {"landmarks": 1}}, {"weights": {"landmarks": 3}}]


def test_resolved_config_round_trips_as_toml(tmp_path):
    cfg = load_config(write(tmp_path, BASE), profile="small")
    again = tmp_path / "resolved.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again) == cfg


def test_labels_must_be_folder_and_key_safe():
    with pytest.raises(ConfigError, match=r"strategies\.a/b: a label may hold"):
        validate_config({"strategies": {"single": {}, "a/b": {"use": "joint"}}})


def test_grid_into_a_non_table_is_one_line(tmp_path):
    from mtlbench.config import StrategyEntry

    with pytest.raises(ConfigError, match=r"grid key 'weights.landmarks': 'weights' is not a table"):
        expand_grid(StrategyEntry(params={"weights": 2.0}, grid={"weights.landmarks": [1, 3]}))


def test_repeated_seed_is_an_error(tmp_path):
    from mtlbench.orchestrate.grid import expand

    cfg = load_config(write(tmp_path, BASE), sets=["experiment.seeds=[0, 0]"])
    with pytest.raises(ConfigError, match="appears twice"):
        expand(cfg)
    assert len(expand(load_config(write(tmp_path, BASE)))) == 3 * 3  # (single + joint x 2) x 3 folds


def test_profile_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match="profiles.cpu must be a table"):
        load_config(write(tmp_path, "[profiles]\ncpu = 3\n"), profile="cpu")


def test_fractional_gpus_above_one_rejected():
    with pytest.raises(ConfigError, match="resources.gpus_per_trial"):
        validate_config({"resources": {"gpus_per_trial": 1.5}})
    assert validate_config({"resources": {"gpus_per_trial": 2}}).resources.gpus_per_trial == 2


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("epochs = 4", "epochs = true", "train.epochs"),  # a boolean is not a whole number
        ("epochs = 4", "epochs = 4.5", "train.epochs"),
        ("batch_size = 2", "batch_size = 2\nlr = inf", "train.lr"),
        ("batch_size = 2", "batch_size = 2\nlr = nan", "train.lr"),
        ("batch_size = 2", "batch_size = 2\nlr_decay_factor = -inf", "train.lr_decay_factor"),
        ("[strategies.single]", "[strategies.single]\nenabled = 1", "strategies.single.enabled"),
        ("folds = 3", "folds = 3\nseeds = [0, true]", "experiment.seeds"),
    ],
)
def test_values_a_trial_would_reject_are_config_errors(tmp_path, old, new, key):
    """Strict whole numbers and booleans, finite floats: found at load time, not inside every trial."""
    p = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert key in msg and str(p) in msg and "\n" not in msg


def test_slice_size_must_fit_the_model_depth(tmp_path):
    """Checked before a run starts (a cache-only config may use any size)."""
    p = write(tmp_path, BASE.replace("preprocess = { slice_size = [64, 64] }", "preprocess = { slice_size = [30, 30] }"))
    check_trainable(load_config(p, profile="small"))  # widths [8, 16] pool once: 30 x 30 fits
    cfg = load_config(p, sets=["preprocess.slice_size=[30, 30]"])  # the base's 5 widths pool 4 times
    with pytest.raises(ConfigError, match=r"preprocess.slice_size 30x30 must be divisible by 16 .*model.widths"):
        check_trainable(cfg, str(p))
