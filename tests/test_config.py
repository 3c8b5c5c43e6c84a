from pathlib import Path

import pytest
import yaml

from vlmerge.cli import main
from vlmerge.config import ConfigError, load_config, parse_value, save_resolved

REPO = Path(__file__).resolve().parents[1]


def test_embedded_demo_config_is_the_repo_demo_config():
    assert load_config() == load_config(REPO / "configs" / "demo.yaml")


def test_paper_config_validates_with_the_paper_setup():
    cfg = load_config(REPO / "configs" / "babylm-takmaz2025.yaml")
    assert cfg.model.num_layers == 6 and cfg.train.epochs == 10
    assert cfg.features.layer == -2 and cfg.features.pooling == "mean_patch"
    assert cfg.sweep.alphas[0] == 0.0 and cfg.sweep.alphas[-1] == 1.0 and len(cfg.sweep.alphas) == 11


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    # a key renamed in the code must be renamed in every config a user is told to run
    assert load_config(path).experiment


def test_overrides_are_typed_and_placeholders_follow_the_root():
    cfg = load_config(None, ["train.lr=3e-4", "paths.root=/scratch/x", "sweep.alphas=[0, 0.5, 1]"])
    assert cfg.train.lr == 3e-4
    assert cfg.sweep.alphas == [0.0, 0.5, 1.0]
    assert cfg.features.encoder == "/scratch/x/demo/dinov2-tiny"
    assert cfg.layout.tokenizer_dir == Path("/scratch/x/runs/demo/tokenizer")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "unknown key 'train.lrr'; allowed here: epochs, micro_batch_size, grad_accum, global_batch, lr, "),
        ("features.pooling=max", "features.pooling: Input should be 'mean_patch', 'cls' or 'mean_all'"),
        ("tokenizer.vocab_size=10", "tokenizer.vocab_size: Input should be greater than or equal to 300"),
        ("features.images=[{manifest: a, bogus: 1}]", "unknown key 'features.images.0.bogus'; allowed here: manifest, format, images_dir"),
        ("train", "expected KEY.PATH=VALUE"),
        ("features={grid: 2, pooling: cls}", "features.grid: Value error, a grid of 2×2 cells needs pooling: "
                                             "mean_patch"),
        ("features={grid: 2, imports: [{captions: c.json, npy: [a.npy], prefix: cc, encoder: e, layer: -2, "
         "pooling: mean_patch}]}", "features.grid: Value error, a grid cannot take features.imports"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_reports_config_errors_in_one_line_and_exits_nonzero(capsys):
    assert main(["tokenizer", "nonsense.key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'nonsense'" in err[0]


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.01"])
    save_resolved(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 0.01


def test_a_config_extends_another_and_overrides_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text("experiment: base\ntrain: {lr: 0.1, epochs: 3}\nsweep: {alphas: [0.0, 1.0]}\n")
    (tmp_path / "small.yaml").write_text("extends: base.yaml\nexperiment: small\ntrain: {epochs: 1}\n")
    cfg = load_config(tmp_path / "small.yaml")
    assert (cfg.experiment, cfg.train.lr, cfg.train.epochs, cfg.sweep.alphas) == ("small", 0.1, 1, [0.0, 1.0])
    (tmp_path / "base.yaml").write_text("extends: small.yaml\n")
    with pytest.raises(ConfigError, match="base.yaml: extends small.yaml: a loop of configs extending each other"):
        load_config(tmp_path / "small.yaml")
    (tmp_path / "odd.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="odd.yaml: extends: expected the path of the config this one overlays"):
        load_config(tmp_path / "odd.yaml")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "lost.yaml")


def test_null_in_an_overlay_drops_the_base_configs_entry(tmp_path):
    (tmp_path / "base.yaml").write_text("eval:\n  tasks: {blimp: /b, ewok: /e}\n  features: /store.h5\n"
                                        "sweep: {best_text_data: /full}\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\neval:\n  tasks: {ewok: null, vqa: /v}\n  features: null\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.eval.tasks == {"blimp": "/b", "vqa": "/v"}  # ewok dropped, vqa added
    assert cfg.eval.features is None and cfg.sweep.best_text_data == "/full"  # the default back; the rest kept


def test_a_number_in_exponent_notation_is_a_number_on_the_command_line():
    # YAML 1.1 (PyYAML) reads `1e-3` as a string: `--param eps=1e-3` was refused as "expected a number"
    assert parse_value("1e-3", "x") == 0.001 and parse_value("-2E+2", "x") == -200.0
    assert parse_value("1.5e3", "x") == 1500.0 and parse_value("e3", "x") == "e3"
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
