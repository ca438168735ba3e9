"""check-config against plugin manifests (flux_edge.plugins.checks, the plugins domain) and
sha256 pinning, with modules built from plugins/ (their manifests embedded by the build)."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flux_edge.config import plugin_files
from flux_edge.errors import ConfigError, PluginError, Problem
from flux_edge.kinds import check_config_text
from flux_edge.plugins import manifest as mf
from flux_edge.plugins.tooling import build_plugin

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wasm")
    try:
        for folder in ("json_normalize", "nmea0183", "examples/vendor_frame"):
            build_plugin(REPO / "plugins" / folder, out)
    except PluginError as exc:
        pytest.skip(f"no wasm toolchain: {exc}")
    return out


@pytest.fixture
def check(built: Path, tmp_path: Path) -> Iterator[Callable[[str], list[Problem]]]:
    """check-config of a text in tmp_path with the plugins in tmp_path/plugins."""
    shutil.copytree(built, tmp_path / "plugins")

    def run(text: str) -> list[Problem]:
        path = tmp_path / "flux.toml"
        text = textwrap.dedent(text)
        path.write_text(text, encoding="utf-8")
        _config, problems = check_config_text(text, str(path))
        return [p for p in problems if "plugin" in p.path or p.path.startswith("plugins")]

    yield run


SOURCE = """
[sources.sensors]
type = "mqtt"
host = "localhost"
topics = ["sensors/#"]
chain = ["json_normalize"]
"""


def test_typos_in_plugin_config_are_found_with_lines(check: Callable[[str], list[Problem]]) -> None:
    problems = check(
        SOURCE
        + """
[plugins.json_normalize.config]
ts_unit = "msec"
fields = [
  { path = "temp", name = "temperature", requried = true },
  { path = "hum", scale = "0.1" },
]
"""
    )
    got = [(p.path, p.line, p.severity, p.message) for p in problems]
    assert got == [
        (
            "plugins.json_normalize.config.ts_unit",
            9,
            "error",
            '"msec" is not allowed; did you mean "ms"? choose one of "auto", "s", "ms", "us", '
            '"iso8601"',
        ),
        (
            "plugins.json_normalize.config.fields[0].requried",
            11,
            "error",
            'unknown key "requried"; did you mean "required"? known keys: map, map_default, name, '
            "name_path, offset, path, required, scale, unit, unit_path",
        ),
        (
            "plugins.json_normalize.config.fields[1].scale",
            12,
            "error",
            'expected a number, got "0.1"',
        ),
    ]


def test_missing_required_config(check: Callable[[str], list[Problem]]) -> None:
    problems = check(
        SOURCE + '\n[plugins.json_normalize.config]\neach = [{ fields = [{ path = "v" }] }]\n'
    )
    assert [(p.path, p.message) for p in problems] == [
        (
            "plugins.json_normalize.config.each[0]",
            '"path" is required (the array or object to iterate (".": the document itself))',
        )
    ]
    assert problems[0].line == SOURCE.count("\n") + 3


def test_valid_config_is_quiet(check: Callable[[str], list[Problem]]) -> None:
    problems = check(
        SOURCE.replace('["json_normalize"]', '["nmea0183"]')
        + '\n[plugins.nmea0183.config]\nunknown = "error"\nsentences = ["GGA", "RMC"]\n'
    )
    assert problems == []


def test_kind_must_suit_the_use(check: Callable[[str], list[Problem]]) -> None:
    problems = check(
        SOURCE.replace('["json_normalize"]', '["vendor_frame"]') + "\n[plugins.vendor_frame]\n"
    )
    assert [p.message for p in problems if p.severity == "error"] == [
        'plugin "vendor_frame" is used by a source\'s chain but its manifest says kind "action" '
        "(it does not export flux_process)"
    ]


def test_module_without_manifest_warns(
    check: Callable[[str], list[Problem]], tmp_path: Path
) -> None:
    wasm = tmp_path / "plugins" / "nmea0183.wasm"
    data = wasm.read_bytes()
    module = mf.read_module(data)
    assert module.sections(mf.SECTION)
    wasm.write_bytes(mf.remove_section(data, mf.SECTION))
    base = SOURCE.replace('["json_normalize"]', '["nmea0183"]') + "\n[plugins.nmea0183]\n"
    assert check(base) == []  # nothing is left unchecked without a config table
    problems = check(base + 'config = { sentences = ["GGA"] }\n')
    assert [(p.severity, "has no manifest" in p.message) for p in problems] == [("warning", True)]


# --- sha256 pinning ---------------------------------------------------------------------------


def _config(tmp_path: Path, wasm: Path, pin: str) -> Any:
    plugin = SimpleNamespace(module="", file=str(wasm), sha256=pin)
    return SimpleNamespace(
        plugins={"p": plugin},
        base_dir=tmp_path,
        path=str(tmp_path / "flux.toml"),
        daemon=SimpleNamespace(plugin_dirs=()),
    )


def test_pinned_file_loads_and_a_swapped_one_is_refused(built: Path, tmp_path: Path) -> None:
    wasm = tmp_path / "p.wasm"
    shutil.copyfile(built / "nmea0183.wasm", wasm)
    digest = plugin_files.file_sha256(wasm)
    assert plugin_files.resolve_plugin_path(_config(tmp_path, wasm, digest), "p") == wasm
    assert plugin_files.resolve_plugin_path(_config(tmp_path, wasm, digest.upper()), "p") == wasm
    shutil.copyfile(built / "json_normalize.wasm", wasm)
    with pytest.raises(ConfigError) as err:
        plugin_files.resolve_plugin_path(_config(tmp_path, wasm, digest), "p")
    problem = err.value.problems[0]
    assert problem.path == "plugins.p.sha256"
    assert f"but the config pins {digest}" in problem.message
    assert "refusing to load it" in problem.message


def test_bad_pin_values() -> None:
    assert plugin_files.check_sha256_value("ab" * 32) is None
    assert "64 hex digits" in str(plugin_files.check_sha256_value("abc"))
    assert "64 hex digits" in str(plugin_files.check_sha256_value("zz" * 32))


def test_check_config_refuses_a_file_that_is_not_the_pinned_one(
    check: Callable[[str], list[Problem]], tmp_path: Path
) -> None:
    wasm = tmp_path / "plugins" / "nmea0183.wasm"
    base = SOURCE.replace('["json_normalize"]', '["nmea0183"]') + "\n[plugins.nmea0183]\n"
    good = plugin_files.file_sha256(wasm)
    assert check(base + f'sha256 = "{good}"\n') == []
    problems = check(base + f'sha256 = "{"0" * 64}"\n')
    (p,) = problems
    assert p.path == "plugins.nmea0183.sha256" and p.line == base.count("\n") + 1
    assert f"has sha256 {good}" in p.message and "refusing to load it" in p.message
    (p,) = check(base + 'sha256 = "abc"\n')
    assert p.path == "plugins.nmea0183.sha256" and "64 hex digits" in p.message


def test_a_text_format_module_passes_check_config_without_a_manifest(
    check: Callable[[str], list[Problem]], tmp_path: Path
) -> None:
    # regression: a .wat plugin (wasmtime compiles the text format) was refused as "not a
    # WebAssembly module"; it cannot carry a manifest, so only a config table is warned about
    shutil.copy(REPO / "tests" / "fixtures" / "wat" / "echo.wat", tmp_path / "echo.wat")
    base = SOURCE.replace('["json_normalize"]', '["echo"]')
    base += '\n[plugins.echo]\nfile = "echo.wat"\n'
    assert check(base) == []
    problems = check(base + "config = { a = 1 }\n")
    assert [(p.severity, "has no manifest" in p.message) for p in problems] == [("warning", True)]
