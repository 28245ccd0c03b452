"""A Serve config with some of its application's `args` changed, for benchmarks of variants.

python -m bench.config_variant CONFIG KEY=VALUE [KEY=VALUE ...] --out FILE
  e.g. python -m bench.config_variant configs/tiny.yaml decode.local_prefill_max_tokens=0 \
         --out /tmp/tiny-remote.yaml
KEY is a dotted path under the first application's `args`; VALUE is read as YAML (`0`, `null`,
`{a: 1}`). The result is validated as an app config, so a misspelled key fails here, naming the
valid ones, rather than at `serve run`.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from serving.config import AppConfig

DROP = object()  # a `with_settings` value: remove the key


def variant(config: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """`config` with each `dotted.key=value` of `settings` set in its first application's
    args (sections made as needed); raises ValueError on a malformed or invalid setting."""
    parsed: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"{setting!r}: expected KEY=VALUE")
        parsed[key] = yaml.safe_load(text)
    return with_settings(config, parsed)


def with_settings(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`config` with each dotted key of `settings` set to its value (`DROP`: removed) under the
    first application's args, or, for a key that starts with "/", on the application itself
    (`/runtime_env`). Sections are made as needed; the args are checked as an app config."""
    out = copy.deepcopy(config)
    app = out["applications"][0]
    args = app.setdefault("args", {})
    for key, value in settings.items():
        node = app if key.startswith("/") else args
        *sections, leaf = key.removeprefix("/").split(".")
        for name in sections:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r}: {name} is not a section")
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    AppConfig.from_args(args)  # raises ValueError naming the bad key
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        cfg = variant(yaml.safe_load(Path(args.config).read_text()), args.settings)
    except ValueError as e:
        ap.error(str(e))  # exits 2 with the message, no traceback
    Path(args.out).write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
