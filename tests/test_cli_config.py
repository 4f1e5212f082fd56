"""Config files are checked like flags (a bug hunt of session 21): argparse applies `type` and
`choices` to what is typed, not to defaults, so values from configs/default.yaml or --config
once skipped both, and unknown keys were dropped silently. Each test failed before its fix."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.phantoms import make_phantom


def _scans(tmp_path, n=3):
    src = tmp_path / "scans"
    src.mkdir()
    for i in range(n):
        cv2.imwrite(str(src / f"s{i}.png"), make_phantom("glioma", 96, i)[0])
    return src


def _predict(tmp_path, config_text, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(config_text)
    src = _scans(tmp_path)
    argv = ["predict", "--config", str(cfg), "--input", str(src), "--out", str(tmp_path / "out"),
            "--cls", "cls-lite0-full", "--seg", "none", "--backend", "torch", "--device", "cpu"]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusal is fine too
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_config_batch_size_below_one_is_refused_not_a_silent_empty_run(tmp_path, capsys, value):
    rc, out, err = _predict(tmp_path, f"predict:\n  batch_size: {value}\n", capsys)
    assert rc != 0, out
    assert "batch" in err


def test_config_non_integer_batch_size_gives_an_error_line_not_a_traceback(tmp_path, capsys):
    rc, out, err = _predict(tmp_path, "predict:\n  batch_size: 2.5\n", capsys)
    assert rc != 0 and "batch" in err


def test_config_single_nifti_slice_number_is_parsed_like_the_flag(tmp_path, capsys):
    rc, out, err = _predict(tmp_path, "predict:\n  nifti_slices: 3\n", capsys)
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], rows[0]["error"]


@pytest.mark.parametrize("text", ["predict:\n  batchsize: 8\n", "predicts:\n  batch_size: 8\n"])
def test_config_unknown_key_or_section_is_reported(tmp_path, capsys, text):
    rc, out, err = _predict(tmp_path, text, capsys)
    assert rc != 0
    assert "batchsize" in err or "predicts" in err


def test_a_config_value_outside_the_choices_is_refused(tmp_path, capsys):
    rc, out, err = _predict(tmp_path, "predict:\n  backend: tensorrt\n", capsys)
    assert rc == 2 and "backend = 'tensorrt': expected one of auto, torch, onnx" in err


def test_the_shipped_defaults_pass_the_checks_unchanged():
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    config = load_config()
    commands = next(a for a in build_parser(config)._actions if a.dest == "command").choices
    for name, section in config.items():
        for key, value in section.items() if name != "common" else ():
            assert commands[name].get_default(key.replace("-", "_")) == value, (name, key)


def test_export_of_a_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert main(["export", "--kind", "classifier", "--run", str(bad), "--out", str(tmp_path / "x.pt")]) == 1
    assert "not a loadable weights-only checkpoint" in capsys.readouterr().err


def test_missing_default_settings_are_one_error_line(tmp_path, monkeypatch, capsys):
    import pipeline.config as config

    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "default.yaml")
    assert main(["predict", "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "the default settings are missing" in capsys.readouterr().err


def _defaults(tmp_path, text: str, command: str) -> dict:
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    cfg = tmp_path / "my.yaml"
    cfg.write_text(text)
    parser = build_parser(load_config(cfg))
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: sub.get_default(a.dest) for a in sub._actions}


def test_yaml_yes_and_no_reach_each_flag_as_its_own_text_would(tmp_path):
    assert _defaults(tmp_path, "train-unet:\n  pretrained: false\n", "train-unet")["pretrained"] == "false"
    assert _defaults(tmp_path, "train-cls:\n  refit: 'no'\n", "train-cls")["refit"] is False
    assert _defaults(tmp_path, "predict:\n  overlays: yes\n", "predict")["overlays"] is True


def test_yaml_lists_for_a_comma_list_and_a_repeatable_flag(tmp_path):
    assert _defaults(tmp_path, "predict:\n  nifti_slices: [3, 4]\n", "predict")["nifti_slices"] == [3, 4]
    got = _defaults(tmp_path, "compare:\n  subset: sartaj=list.txt\n", "compare")["subset"]
    assert got == ["sartaj=list.txt"]


@pytest.mark.parametrize("text", ["train-cls:\n  epochs: yes\n", "common:\n  devcie: cpu\n",
                                  "predict:\n  config: other.yaml\n"])
def test_more_config_mistakes_are_refused(tmp_path, text):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError):
        _defaults(tmp_path, text, "predict")


def test_crop_names_its_cache_after_the_folder_and_refuses_a_size_of_zero(tmp_path, monkeypatch):
    from pipeline.phantoms import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=1, size=48, seed=0)
    monkeypatch.chdir(root / "Testing")
    assert main(["crop", "--input", ".", "--mode", "full", "--size", "32", "--out", str(tmp_path / "cache")]) == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["testing.npz"]  # not ".npz"
    with pytest.raises(SystemExit):
        main(["crop", "--input", ".", "--mode", "full", "--size", "0", "--out", str(tmp_path / "cache")])


def test_a_switch_set_on_in_a_config_can_be_turned_off_by_a_flag():
    from pipeline.cli import build_parser

    parser = build_parser({"train-cls": {"refit": True}, "predict": {"overlays": True}})
    base = ["train-cls", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).refit is True
    assert parser.parse_args(base + ["--no-refit"]).refit is False
    assert parser.parse_args(["predict", "--input", "i", "--out", "o", "--no-overlays"]).overlays is False


def test_a_required_flag_given_by_the_config_file_is_not_asked_for_again():
    from pipeline.cli import build_parser

    args = build_parser({"predict": {"input": "scans", "out": "results"}}).parse_args(["predict"])
    assert (args.input, args.out) == ("scans", "results")
    with pytest.raises(SystemExit):  # still required where the config does not give it
        build_parser({}).parse_args(["predict"])


def test_null_in_a_users_config_means_the_default_and_yaml_scalars_are_text(tmp_path):
    # default.yaml uses null for "the default"; in a user's file it replaced values that have no
    # other default (predict's batch size became None and crashed, seg: null meant no segmenter)
    got = _defaults(tmp_path, "predict:\n  batch_size: null\n  seg: null\n  nifti_slices: null\n", "predict")
    assert (got["batch_size"], got["seg"], got["nifti_slices"]) == (32, "auto", "nonempty")
    # a YAML number or yes/no for an option that takes a name is that text, as typed on the command line
    got = _defaults(tmp_path, "predict:\n  cls: 5\n  seg: no\n", "predict")
    assert (got["cls"], got["seg"]) == ("5", "false")
    assert _defaults(tmp_path, "common:\n  device: 1\n", "predict")["device"] == "1"


@pytest.mark.parametrize("argv", [
    ["seg-data", "--out", "o", "--n-background", "-1"],          # sliced as [:-1]: all but one background
    ["segment", "--input", "i", "--out", "o", "--batch-size", "-1"],
    ["segment", "--input", "i", "--out", "o", "--workers", "0"],
    ["evaluate-cls", "--out", "o", "--alpha", "5"],
    ["compare", "--runs", "a=b", "--out", "o", "--n-boot", "0"],  # null intervals, silently
    ["train-cls", "--data", "d", "--out", "o", "--epochs", "-1"],
    ["train-cls", "--data", "d", "--out", "o", "--batch-size", "0"],
])
def test_out_of_range_numbers_are_refused_by_the_parser(argv, capsys):
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    with pytest.raises(SystemExit):
        build_parser(load_config()).parse_args(argv)
    assert "must" in capsys.readouterr().err


def test_no_resume_set_in_a_config_can_be_undone_by_a_flag():
    from pipeline.cli import build_parser

    parser = build_parser({"train-cls": {"resume": False}})
    base = ["train-cls", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).resume is False
    assert parser.parse_args(base + ["--resume"]).resume is True
    assert build_parser({}).parse_args(base + ["--no-resume"]).resume is False  # the flag users know still works


def test_a_repeatable_flag_replaces_the_config_files_list():
    from pipeline.cli import build_parser

    parser = build_parser({"compare": {"subset": ["sartaj=a.txt"]}})
    base = ["compare", "--runs", "x=y", "--out", "o"]
    assert parser.parse_args(base).subset == ["sartaj=a.txt"]
    assert parser.parse_args(base + ["--subset", "b=b.txt", "--subset", "c=c.txt"]).subset == ["b=b.txt", "c=c.txt"]
    assert parser.parse_args(base).subset == ["sartaj=a.txt"]  # the config's list itself is left as it was
