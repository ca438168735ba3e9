"""flux_edge.plugins.tooling: scaffold plugins in both languages, build them with the real
toolchain, and check the result is a module with the ABI v1 exports that runs its golden case.
(No network: the Rust build uses Debian's packaged crates, offline.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_edge.errors import PluginError
from flux_edge.plugins import tooling
from flux_edge.plugins.tooling import build_plugin, new_plugin
from tests.support.plugin_output import records_as_json

ABI_EXPORTS = {
    "memory",
    "flux_abi_version",
    "flux_alloc",
    "flux_dealloc",
    "flux_init",
    "flux_process",
}

try:
    from flux_edge.model import ErrorRecord, Measurement, Reading
    from flux_edge.plugins.host import PluginHost, PluginLimits

    HAVE_HOST = True
except ImportError:
    HAVE_HOST = False


def _need(tool: str) -> None:
    if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
        pytest.skip(f"{tool} is not installed")


def _exports(wasm: Path) -> set[str]:
    """Export names, from wabt's wasm-objdump (used only when the host module is missing)."""
    _need("wasm-objdump")
    text = subprocess.run(
        ["wasm-objdump", "-x", "-j", "Export", str(wasm)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r'-> "([^"]+)"', text))


def _run_example(wasm: Path, folder: Path) -> list[dict[str, Any]]:
    """The scaffold's golden case through the real host: the module loads (exports, imports and
    ABI version checked), accepts its config and processes the messages."""
    cases = folder / "cases"
    config = json.loads((cases / "example.config.json").read_text())
    lines = [json.loads(x) for x in (cases / "example.in.jsonl").read_text().splitlines() if x]
    msgs = []
    for x in lines:
        if "registers" in x:
            msgs.append(
                Reading(
                    source=x["source"],
                    device=x["device"],
                    ts=x["ts"],
                    kind=1,
                    registers=tuple(x["registers"]),
                    function=x["function"],
                    address=x["address"],
                )
            )
        else:
            msgs.append(
                Reading(
                    source=x["source"],
                    device=x["device"],
                    ts=x["ts"],
                    kind=0,
                    payload=x["payload"].encode(),
                )
            )
    with PluginHost(None) as host:
        plugin = host.load(wasm.stem, wasm, PluginLimits(timeout_s=5.0), config)
        indices: list[int] = []
        records = plugin.process(msgs, indices=indices)
        plugin.close()
    return records_as_json(records, indices)


@pytest.fixture(scope="session")
def _target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cargo-target")


@pytest.fixture
def shared_target(_target_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One cargo target directory for this module: the SDK and serde_json compile once."""
    monkeypatch.setenv("CARGO_TARGET_DIR", str(_target_dir))
    yield


# --- new_plugin -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "1abc", "Bad", "a-b", "a.b", "x" * 65, "../up", "é"])
def test_new_plugin_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(PluginError, match="a plugin name is"):
        new_plugin(name, "rust", tmp_path)
    assert not any(tmp_path.iterdir())


def test_new_plugin_rejects_unknown_language(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="unknown language 'go'"):
        new_plugin("p", "go", tmp_path)  # type: ignore[arg-type]


def test_new_plugin_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(PluginError, match="already exists and is not empty"):
        new_plugin("taken", "c", tmp_path)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert new_plugin("empty", "c", tmp_path) == tmp_path / "empty"


def test_rust_scaffold_layout(tmp_path: Path) -> None:
    folder = new_plugin("my_meter", "rust", tmp_path)
    assert folder == tmp_path / "my_meter"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "Cargo.toml",
        "src/lib.rs",
        "README.md",
        "sample-config.toml",
        ".gitignore",
        ".cargo/config.toml",
        "cases/example.in.jsonl",
        "cases/example.config.json",
        "cases/example.out.jsonl",
        "flux-plugin-sdk/Cargo.toml",
        "flux-plugin-sdk/src/lib.rs",
    } <= files
    assert not any("{{" in (folder / f).read_text() for f in files), "unsubstituted placeholder"
    cargo = (folder / "Cargo.toml").read_text()
    assert 'name = "my_meter"' in cargo and 'path = "flux-plugin-sdk"' in cargo
    assert 'panic = "abort"' in cargo
    assert "[plugins.my_meter]" in (folder / "sample-config.toml").read_text()
    # the vendored SDK is the checkout's own
    sdk = tooling.sdk_dir() / "rust" / "src" / "lib.rs"
    assert (folder / "flux-plugin-sdk" / "src" / "lib.rs").read_bytes() == sdk.read_bytes()


def test_c_scaffold_layout(tmp_path: Path) -> None:
    folder = new_plugin("tiny", "c", tmp_path)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "tiny.c",
        "flux_plugin.h",
        "README.md",
        "sample-config.toml",
        "cases/example.in.jsonl",
    } <= files
    assert not any("{{" in (folder / f).read_text() for f in files)


# --- build_plugin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["c", "rust"])
def test_scaffold_builds_to_a_working_module(
    tmp_path: Path, lang: str, shared_target: None
) -> None:
    _need("clang-14" if lang == "c" else "cargo")
    folder = new_plugin(f"demo_{lang}", lang, tmp_path)  # type: ignore[arg-type]
    wasm = build_plugin(folder)
    assert wasm == folder / f"demo_{lang}.wasm"
    assert wasm.read_bytes()[:4] == b"\0asm"
    size = wasm.stat().st_size
    assert size < (200_000 if lang == "rust" else 40_000), size
    if HAVE_HOST:
        expected = [
            json.loads(x)
            for x in (folder / "cases" / "example.out.jsonl").read_text().splitlines()
            if x
        ]
        assert _run_example(wasm, folder) == expected
    else:
        assert _exports(wasm) >= ABI_EXPORTS
    # --out: a file path, or a directory to put <name>.wasm in
    out_file = build_plugin(folder, tmp_path / "out" / "renamed.wasm")
    assert (
        out_file == tmp_path / "out" / "renamed.wasm" and out_file.read_bytes() == wasm.read_bytes()
    )
    assert build_plugin(folder, tmp_path / "out") == tmp_path / "out" / wasm.name


def test_rust_build_failure_carries_the_compiler_message(
    tmp_path: Path, shared_target: None
) -> None:
    _need("cargo")
    folder = new_plugin("broken", "rust", tmp_path)
    lib = folder / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace("Ok(State { scale, prefix })", "Ok(State { scale })"))
    with pytest.raises(PluginError) as info:
        build_plugin(folder)
    msg = str(info.value)
    assert msg.startswith("plugin 'broken': cargo failed")
    assert "missing field `prefix`" in msg and "src/lib.rs" in msg


def test_c_build_failure_carries_the_compiler_message(tmp_path: Path) -> None:
    _need("clang-14")
    folder = new_plugin("oops", "c", tmp_path)
    src = folder / "oops.c"
    src.write_text(src.read_text() + "\nint broken(void) { return undefined_thing; }\n")
    with pytest.raises(PluginError) as info:
        build_plugin(folder)
    msg = str(info.value)
    assert re.match(r"plugin 'oops': clang(-14)? failed \(exit 1\)", msg), msg
    assert "undefined_thing" in msg and "oops.c" in msg


def test_c_plugin_without_vendored_header_uses_the_sdk(tmp_path: Path) -> None:
    _need("clang-14")
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "bare.c").write_text(
        '#include "flux_plugin.h"\n'
        "int flux_plugin_init(const char *c, uint32_t n) { (void)c; (void)n; return 0; }\n"
        "void flux_plugin_process(const flux_msg *m, flux_out *o) {\n"
        '    flux_out_i64(o, "n", m->payload_len, "B");\n}\n'
    )
    wasm = build_plugin(folder)
    assert wasm.name == "bare.wasm" and wasm.read_bytes()[:4] == b"\0asm"


def test_nothing_to_build(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no sources here")
    with pytest.raises(PluginError, match=r"expected a Cargo.toml \(Rust\) or \*.c files"):
        build_plugin(tmp_path)
    with pytest.raises(PluginError, match="is not a directory"):
        build_plugin(tmp_path / "missing")


def test_rust_crate_without_cdylib_is_explained(tmp_path: Path, shared_target: None) -> None:
    _need("cargo")
    folder = tmp_path / "lib_only"
    (folder / "src").mkdir(parents=True)
    (folder / "Cargo.toml").write_text(
        '[package]\nname = "lib-only"\nversion = "0.1.0"\nedition = "2021"\n[workspace]\n'
    )
    (folder / "src" / "lib.rs").write_text("pub fn f() {}\n")
    with pytest.raises(PluginError, match=r"crate-type = \[\"cdylib\"\]"):
        build_plugin(folder)


def test_missing_compiler_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = new_plugin("nocc", "c", tmp_path)
    monkeypatch.setenv("FLUX_EDGE_CLANG", str(tmp_path / "no-such-clang"))
    with pytest.raises(PluginError, match="no-such-clang not found"):
        build_plugin(folder)


def test_rust_panic_becomes_a_trap(tmp_path: Path, shared_target: None) -> None:
    """panic = "abort": a panic ends the call with a trap, never with garbage output."""
    _need("cargo")
    if not HAVE_HOST:
        pytest.skip("needs flux_edge.plugins.host")
    folder = new_plugin("panicky", "rust", tmp_path)
    lib = folder / "src" / "lib.rs"
    lib.write_text(
        lib.read_text().replace(
            "    for (i, word) in msg.registers().enumerate() {",
            '    assert!(msg.device != "bomb", "boom");\n'
            "    for (i, word) in msg.registers().enumerate() {",
        )
    )
    wasm = build_plugin(folder)
    msgs = [
        Reading(source="s", device=d, ts=1.0, kind=1, registers=(1,), function=3, address=0)
        for d in ("ok", "bomb")
    ]
    with PluginHost(None) as host:
        plugin = host.load("panicky", wasm, PluginLimits(timeout_s=5.0), {})
        failed = plugin.process(msgs)
        assert len(failed) == 2 and all(isinstance(r, ErrorRecord) for r in failed)
        assert all("trap" in r.error.lower() for r in failed if isinstance(r, ErrorRecord))
        # the instance was replaced: the next batch works
        (ok,) = plugin.process(msgs[:1])
        assert isinstance(ok, Measurement) and ok.name == "r0"
        plugin.close()
