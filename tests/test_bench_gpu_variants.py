"""`bench.gpu_variants`: the GPU token-path variants are valid app configs that differ from their
base config only where their settings say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.config_variant import DROP, with_settings
from bench.gpu_variants import PD, VARIANTS, main, resolve, write


def _load(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _at(app: dict, key: str):
    node = app if key.startswith("/") else app["args"]
    *sections, leaf = key.removeprefix("/").split(".")
    for name in sections:
        node = node[name]
    return node.get(leaf, DROP)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fixed_variant_changes_only_its_settings(name: str, tmp_path: Path) -> None:
    base, settings = VARIANTS[name]
    got = _load(write(name, tmp_path))["applications"][0]
    for key, value in settings.items():
        if value is DROP:
            assert _at(got, key) is DROP
        else:
            assert _at(got, key) == value
    # with the base's values put back (DROP where the base has none), nothing else differs
    want = _load(base)["applications"][0]
    back = with_settings({"applications": [got]}, {key: _at(want, key) for key in settings})
    assert back["applications"][0] == want


def test_pd_mps_is_the_committed_config(tmp_path: Path) -> None:
    assert _load(write("pd_mps", tmp_path)) == _load(PD)


def test_gil_and_batch_families_build_on_any_base(tmp_path: Path) -> None:
    app = _load(write("colo_fp8_gil0.1", tmp_path))["applications"][0]
    assert app["runtime_env"] == {"env_vars": {"PDSERVE_GIL_SWITCH_MS": "0.1"}}
    assert app["args"]["model"]["quantize"] == "fp8"  # colo_fp8's own setting kept
    args = _load(write("pd_mps_batch32", tmp_path))["applications"][0]["args"]
    assert args["submit_batch"] == 32
    assert resolve("pd_batch8") == (PD, {"submit_batch": 8})


def test_unknown_name_fails_naming_the_variants(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        resolve("pd_bogus")
    with pytest.raises(SystemExit, match="unknown variant 'pd_bogus'.*pd_mps_even"):
        main(["pd_bogus", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())
