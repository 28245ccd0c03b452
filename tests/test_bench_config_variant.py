"""`bench.config_variant`: a Serve config with some app args changed, checked as an app config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.config_variant import main, variant

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_a_nested_arg_is_set_and_everything_else_kept(tmp_path: Path) -> None:
    base = yaml.safe_load(TINY.read_text())
    out = tmp_path / "remote.yaml"
    main([str(TINY), "decode.local_prefill_max_tokens=0", "limits.queue_timeout_s=3.5",
          "--out", str(out)])
    got = yaml.safe_load(out.read_text())
    args, base_args = got["applications"][0]["args"], base["applications"][0]["args"]
    assert base_args["decode"]["local_prefill_max_tokens"] == 64
    assert args["decode"] == {"local_prefill_max_tokens": 0}
    assert args["limits"] == {**base_args["limits"], "queue_timeout_s": 3.5}
    rest = ("decode", "limits")
    assert {k: v for k, v in args.items() if k not in rest} == \
        {k: v for k, v in base_args.items() if k not in rest}
    got["applications"][0]["args"] = base_args
    assert got == base  # the deployments, the proxy and gRPC options untouched


def test_a_new_section_is_made_and_yaml_values_parsed() -> None:
    cfg = {"applications": [{"name": "x", "import_path": "cluster.app:build_app"}]}
    got = variant(cfg, ["routing.policy=prefix", "model.path=null", "engine.page_size=32"])
    assert got["applications"][0]["args"] == {
        "routing": {"policy": "prefix"}, "model": {"path": None}, "engine": {"page_size": 32}}
    assert "args" not in cfg["applications"][0]  # the input is not changed


@pytest.mark.parametrize("setting, message", [
    ("decode.local_prefil_max_tokens=0", "decode.local_prefil_max_tokens: unknown key"),
    ("decode.local_prefill_max_tokens=-1", "decode.local_prefill_max_tokens"),
    ("decode", "expected KEY=VALUE"),
    ("mode.x=1", "mode is not a section"),
])
def test_a_bad_setting_is_refused_with_its_key(setting: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variant(yaml.safe_load(TINY.read_text()), [setting])


def test_the_cli_exits_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(TINY), "decode.replicas=2", "--out", str(tmp_path / "x.yaml")])
    assert stop.value.code == 2
    assert "decode.replicas: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
