from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from observd.cli import main
from observd.config import ConfigError, config_from_dict, load_config, to_toml

REPO = Path(__file__).resolve().parents[1]


def test_example_config_loads_with_contract_keys():
    config = load_config(REPO / "config" / "observd.toml")
    assert config.paths.incoming == (Path("/srv/camera"),)
    assert config.paths.products == Path("/var/lib/observd/products")
    assert config.paths.catalog == Path("/var/lib/observd/observd.sqlite")
    assert config.site.timezone == "America/Los_Angeles"
    assert (config.web.host, config.web.port) == ("127.0.0.1", 8470)
    assert "Red" in config.headers.filter_aliases["R"]


def test_defaults_without_a_file():
    config = load_config(None)
    assert config.source is None
    assert config.web.port == 8470
    assert config.watch.mode == "auto"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nincoming = "cam"\ncatalog = "db/o.sqlite"\n')
    config = load_config(path)
    assert config.paths.incoming == (tmp_path / "cam",)
    assert config.paths.catalog == tmp_path / "db" / "o.sqlite"
    assert config.log_dir == tmp_path / "db"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[paths]\nincomming = []\n", "unknown key [paths] 'incomming'; expected one of"),
        ("[pathz]\n", "unknown key 'pathz'"),
        ('[web]\nport = "8470"\n', "web.port must be an integer, got a string ('8470')"),
        ("[web]\nport = 70000\n", "web.port must be within 1..65535"),
        ('[site]\ntimezone = "Mars/Olympus"\n', "site.timezone must be an IANA timezone"),
        ("[site]\nlatitude = 123.0\n", "site.latitude must be within -90..90"),
        ('[watch]\nmode = "fast"\n', "watch.mode must be one of 'auto', 'inotify', 'polling'"),
        ("[watch]\nsettle_seconds = true\n", "watch.settle_seconds must be a number"),
        ("[paths]\nincoming = [3]\n", "paths.incoming[0] must be a path"),
        ("paths = 3\n", "[paths] must be a table"),
        ('[headers.filter_aliases]\nR = ["Red"]\nV = ["red"]\n', "'red' is listed for both"),
        ('[headers.filter_aliases]\nR = ["Rc"]\nV = ["rc"]\n', "'rc' is listed for both"),
        ("[web\n", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_a_path_of_the_wrong_kind_is_an_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nincoming = ["afile"]\n')
    with pytest.raises(ConfigError, match=r"paths.incoming\[0\] must be a folder"):
        load_config(path)
    path.write_text('[paths]\ncatalog = "."\n')
    with pytest.raises(ConfigError, match="paths.catalog must be a file path"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_effective_config_round_trips(tmp_path):
    config = load_config(REPO / "config" / "observd.toml")
    again = config_from_dict(tomllib.loads(to_toml(config)), source=tmp_path / "x.toml")
    assert again.paths == config.paths
    assert again.site == config.site
    assert again.headers == config.headers
    assert again.watch == config.watch


def test_cli_config_prints_effective_config(capsys, config_file):
    assert main(["config", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)
    assert data["paths"]["catalog"] == str(config_file.parent / "observd.sqlite")
    assert data["web"]["port"] == 8470


def test_cli_bad_config_exits_nonzero_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[web]\nport = 'x'\n")
    assert main(["status", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "web.port must be an integer" in err


def test_one_letter_filters_differing_in_case_are_distinct(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[headers.filter_aliases]\nR = ["Red"]\n"r\'" = ["r", "rp"]\n')
    assert load_config(path).headers.filter_aliases["r'"] == ("r", "rp")
