"""flux-edge plugin list | info | verify, and docs/plugins.md, with modules built from plugins/."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from flux_edge.cli import main
from flux_edge.config import plugin_files
from flux_edge.errors import PluginError
from flux_edge.plugins import catalog, docgen
from flux_edge.plugins import manifest as mf
from flux_edge.plugins.tooling import build_plugin

REPO = Path(__file__).resolve().parents[2]
# every plugin folder (one with a manifest), not a list of our own that a new plugin can miss
FOLDERS = tuple(sorted(str(m.parent.relative_to(REPO / "plugins"))
                       for m in (REPO / "plugins").glob("**/manifest.toml")
                       if "target" not in m.parts and "templates" not in m.parts))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every plugin of plugins/, built, as the bundled directory would hold them."""
    out = tmp_path_factory.mktemp("bundled")
    try:
        for folder in FOLDERS:
            if (REPO / "plugins" / folder).is_dir():
                build_plugin(REPO / "plugins" / folder, out)
    except PluginError as exc:
        pytest.skip(f"no wasm toolchain: {exc}")
    catalog.write_sums(out)
    return out


@pytest.fixture
def bundled(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "bundled"
    shutil.copytree(built, copy)
    monkeypatch.setattr(catalog, "bundled_plugin_dir", lambda: copy)
    return copy


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["plugin", *argv])
    return rc, capsys.readouterr().out


def test_every_plugin_has_a_manifest(built: Path) -> None:
    for path in sorted(built.glob("*.wasm")):
        m = mf.read_manifest(path)
        assert m is not None, path
        assert m.name == path.stem and m.abi == 1 and m.description and m.license
        assert mf.check_exports(m, mf.read_module(path.read_bytes())) == []


def test_list_and_json(bundled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "list")
    assert rc == 0
    assert out.splitlines()[0].split() == ["NAME", "VERSION", "KIND", "FROM", "DESCRIPTION"]
    assert any(line.startswith("vendor_frame ") and " action " in line for line in out.splitlines())
    rc, out = run(capsys, "list", "--json")
    rows = json.loads(out)
    assert {r["name"] for r in rows} >= {"json_normalize", "modbus_decode", "nmea0183"}
    assert all(r["ok"] and r["served"] for r in rows)


def test_info(bundled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "info", "nmea0183")
    assert rc == 0
    digest = plugin_files.file_sha256(bundled / "nmea0183.wasm")
    assert f"sha256:  {digest}" in out
    assert 'unknown (string, default "skip")' in out
    assert "example:" in out
    assert main(["plugin", "info", "nmea018"]) == 1
    assert 'did you mean "nmea0183"?' in capsys.readouterr().err


def test_configured_dir_shadows_bundled(
    bundled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site" / "plugins"
    site.mkdir(parents=True)
    shutil.copyfile(bundled / "c_scale.wasm", site / "c_scale.wasm")
    cfg = tmp_path / "site" / "flux.toml"
    cfg.write_text('[daemon]\nplugin_dirs = ["plugins"]\n', encoding="utf-8")
    _rc, out = run(capsys, "list", "--config", str(cfg))
    lines = [line for line in out.splitlines() if line.startswith("c_scale ")]
    assert [line.split()[3] for line in lines] == ["plugins", "bundled"]
    assert "(shadowed)" in lines[1]


def test_verify_finds_swapped_and_bad_modules(
    bundled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(capsys, "verify")
    assert rc == 0, out
    shutil.copyfile(bundled / "json_normalize.wasm", bundled / "nmea0183.wasm")
    (bundled / "junk.wasm").write_bytes(b"not wasm")
    shutil.copyfile(bundled / "c_scale.wasm", bundled / "extra.wasm")
    rc, out = run(capsys, "verify")
    assert rc == 1
    assert 'the manifest names "json_normalize", the file "nmea0183.wasm"' in out
    assert "sha256 differs from SHA256SUMS: the shipped file was replaced" in out
    assert "not a WebAssembly module" in out
    assert "not listed in SHA256SUMS" in out


def test_verify_config_pins_and_config(
    bundled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = plugin_files.file_sha256(bundled / "nmea0183.wasm")
    cfg = tmp_path / "flux.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [plugins.nmea0183]
        sha256 = "{digest}"
        [plugins.nmea0183.config]
        unknwn = "skip"
        [plugins.c_scale]
        sha256 = "{"0" * 64}"
        """),
        encoding="utf-8",
    )
    rc, out = run(capsys, "verify", "--config", str(cfg))
    assert rc == 1
    assert 'plugins.nmea0183.config.unknwn: unknown key "unknwn"; did you mean "unknown"?' in out
    assert 'plugins.c_scale.sha256: plugin "c_scale":' in out
    assert "but the config pins 0000" in out


def test_docs_are_current(built: Path) -> None:
    text = docgen.render(docgen.manifests_in(built))
    current = docgen.DOC.read_text(encoding="utf-8") if docgen.DOC.is_file() else ""
    assert current == text, "docs/plugins.md is stale: python -m flux_edge.plugins.docgen --write"
