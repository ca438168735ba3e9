"""`flux-edge plugin new` scaffolds carry a manifest.toml, so a new plugin's config is checked
by check-config from its first build: the template's schema is valid, describes exactly the
keys its example code reads, and accepts the scaffold's own sample config and golden-case
config while refusing a typo."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from flux_edge.plugins import manifest as mf
from flux_edge.plugins.tooling import new_plugin


def _schema(folder: Path) -> dict[str, object]:
    data = tomllib.loads((folder / "manifest.toml").read_text(encoding="utf-8"))
    assert "{{" not in (folder / "manifest.toml").read_text(encoding="utf-8")
    config = data["config"]
    assert isinstance(config, dict)
    assert mf.check_schema(config, ()) == []
    return config


@pytest.mark.parametrize("lang", ["rust", "c"])
def test_scaffold_has_a_valid_manifest(tmp_path: Path, lang: str) -> None:
    folder = new_plugin("new_meter", lang, tmp_path)  # type: ignore[arg-type]
    schema = _schema(folder)
    props = schema["properties"]
    assert isinstance(props, dict) and set(props) == {"scale", "prefix"}
    sample = tomllib.loads((folder / "sample-config.toml").read_text(encoding="utf-8"))
    table = sample["plugins"]["new_meter"]["config"]
    case = json.loads((folder / "cases" / "example.config.json").read_text(encoding="utf-8"))
    case.pop("source", None)
    configs: list[object] = [table, case, {}]
    for config in configs:
        assert mf.validate_config(schema, config) == [], config
    problems = mf.validate_config(schema, {"scael": 2.0})
    assert problems and "scale" in str(problems)
    assert mf.validate_config(schema, {"scale": "x"})


def test_c_scaffold_build_embeds_the_manifest(tmp_path: Path) -> None:
    import shutil

    from flux_edge.plugins.tooling import build_plugin

    if shutil.which("clang-14") is None:
        pytest.skip("clang-14 is not installed")
    folder = new_plugin("new_c", "c", tmp_path)
    manifest = mf.read_manifest(build_plugin(folder))
    assert manifest is not None
    assert manifest.name == "new_c" and manifest.license == "Apache-2.0"
    assert set(manifest.config["properties"]) == {"scale", "prefix"}
    assert "[plugins.new_c]" in (manifest.example or "")
