"""Plugin tooling: scaffold a plugin (``flux-edge plugin new``) and build it (``plugin build``).

Scaffolds come from the templates in ``flux_edge/plugins/templates/{rust,c}/`` (package data).
The SDK is *vendored* into every new plugin (``flux-plugin-sdk/`` for Rust, ``flux_plugin.h``
for C) so a plugin folder builds offline from anywhere, with no path back into a flux-edge
checkout or an installed wheel. The SDK sources are taken from the checkout's ``plugins/sdk``
when this module runs from one, else from ``templates/sdk`` (copied there by
``plugins/build-all.sh`` before a wheel is built, like the bundled .wasm files).

Builds use the toolchain described in docs/plugin-guide.md: Debian's Rust 1.63 with the
packaged crates in ``/usr/share/cargo/registry`` (offline), and clang-14 with wasm-ld for C.
Environment overrides: ``FLUX_EDGE_CARGO``, ``FLUX_EDGE_RUSTC`` (else ``RUSTC``),
``FLUX_EDGE_CLANG``, ``FLUX_EDGE_CARGO_REGISTRY`` (a directory of vendored crates, used as the
cargo source ``debian-packages``; empty = use crates.io as configured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from flux_edge.errors import PluginError
from flux_edge.plugins import manifest as mf

Lang = Literal["rust", "c"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
_REPO_SDK = Path(__file__).resolve().parents[2] / "plugins" / "sdk"
_PACKAGED_SDK = TEMPLATES / "sdk"
_DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
_DEBIAN_WASM_STD = Path("/usr/lib/rustlib/wasm32-unknown-unknown")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SDK_RUST_FILES = ("Cargo.toml", "README.md", "src")
_SDK_C_FILES = ("flux_plugin.h",)
WASM_TARGET = "wasm32-unknown-unknown"
C_FLAGS = (
    "--target=wasm32",
    "-O2",
    "-nostdlib",
    "-ffreestanding",
    "-Wall",
    "-Wextra",
    "-Wl,--no-entry",
    "-Wl,--strip-all",
)
BUILD_TIMEOUT_S = 1800.0
_TAIL_LINES = 40


def sdk_dir() -> Path:
    """Where the SDK sources are: the checkout's ``plugins/sdk``, else the packaged copy."""
    for candidate in (_REPO_SDK, _PACKAGED_SDK):
        if (candidate / "rust" / "Cargo.toml").is_file() and (
            candidate / "c" / "flux_plugin.h"
        ).is_file():
            return candidate
    raise PluginError(
        "sdk",
        f"the plugin SDK sources are missing (looked in {_REPO_SDK} and {_PACKAGED_SDK}); "
        "run plugins/build-all.sh in a flux-edge checkout, or reinstall flux-edge",
    )


# --- plugin new -----------------------------------------------------------------------------------


def new_plugin(name: str, lang: Lang, dest: Path) -> Path:
    """Create ``dest/name/``: a plugin project in ``lang`` with the SDK vendored, a README, a
    sample config section and one golden case. Returns the new folder.

    ``name`` becomes the crate / module name and the .wasm file name: lower case letters,
    digits and ``_``, starting with a letter (so it is also a bare TOML key).
    """
    if not _NAME.fullmatch(name):
        raise PluginError(
            name,
            "a plugin name is 1-64 characters of a-z, 0-9 and _, starting with a letter "
            "(it names the .wasm file and the [plugins.NAME] table)",
        )
    if lang not in ("rust", "c"):
        raise PluginError(name, f"unknown language {lang!r}: choose 'rust' or 'c'")
    template = TEMPLATES / lang
    if not template.is_dir():
        raise PluginError(name, f"the {lang} template is missing ({template}): reinstall flux-edge")
    sdk = sdk_dir()
    target = Path(dest) / name
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PluginError(name, f"{target} already exists and is not empty")
    subst = {"{{name}}": name, "{{lang_title}}": "Rust" if lang == "rust" else "C"}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(template.rglob("*")):
            if src.is_dir() or "__pycache__" in src.parts:
                continue
            rel = src.relative_to(template)
            parts = [
                ("." + p[4:] if p.startswith("dot-") else p).replace("__name__", name)
                for p in rel.parts
            ]
            out = target.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text(encoding="utf-8")
            for key, value in subst.items():
                text = text.replace(key, value)
            out.write_text(text, encoding="utf-8")
        if lang == "rust":
            vendored = target / "flux-plugin-sdk"
            vendored.mkdir()
            for item in _SDK_RUST_FILES:
                _copy(sdk / "rust" / item, vendored / item)
        else:
            for item in _SDK_C_FILES:
                _copy(sdk / "c" / item, target / item)
    except OSError as exc:
        raise PluginError(name, f"cannot create {target}: {exc}") from exc
    return target


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("target", "*.wasm", "Cargo.lock"))
    else:
        shutil.copyfile(src, dst)


# --- plugin build ---------------------------------------------------------------------------------


def build_plugin(directory: Path, out: Path | None = None) -> Path:
    """Build the plugin in ``directory`` and return the .wasm path.

    A ``Cargo.toml`` means Rust (release build for wasm32-unknown-unknown); otherwise the
    ``*.c`` files are compiled with clang for freestanding wasm32, with the folder and the SDK's
    ``flux_plugin.h`` on the include path. The manifest (``manifest.toml`` beside the source, see
    :func:`make_manifest`) is embedded as the ``flux.manifest`` custom section. The module is
    written to ``directory/<name>.wasm``
    (``<name>``: the crate's lib name, or the folder name for C) and, when ``out`` is given,
    copied there too (into it, if ``out`` is a directory) and that path is returned.

    Raises :class:`PluginError` with the tail of the compiler's output when the build fails.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise PluginError(directory.name, f"{directory} is not a directory")
    if (directory / "Cargo.toml").is_file():
        wasm = _build_rust(directory)
    else:
        sources = sorted(directory.glob("*.c"))
        if not sources:
            raise PluginError(
                directory.name,
                f"nothing to build in {directory}: expected a Cargo.toml (Rust) or *.c files (C)",
            )
        wasm = _build_c(directory, sources)
    embed_manifest(directory, wasm)
    if out is None:
        return wasm
    out = Path(out)
    final = out / wasm.name if out.is_dir() else out
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wasm, final)
    except OSError as exc:
        raise PluginError(wasm.stem, f"cannot write {final}: {exc}") from exc
    return final


def _crate_name(directory: Path) -> str:
    manifest = directory / "Cargo.toml"
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PluginError(directory.name, f"cannot read {manifest}: {exc}") from exc
    lib = data.get("lib", {})
    pkg = data.get("package", {})
    name = lib.get("name") if isinstance(lib, dict) else None
    if not isinstance(name, str):
        name = pkg.get("name") if isinstance(pkg, dict) else None
    if not isinstance(name, str) or not name:
        raise PluginError(directory.name, f"{manifest} has no [package] name")
    return name.replace("-", "_")


def _cargo() -> tuple[str, dict[str, str]]:
    env = dict(os.environ)
    cargo = env.get("FLUX_EDGE_CARGO") or (
        "/usr/bin/cargo" if Path("/usr/bin/cargo").exists() else shutil.which("cargo")
    )
    if not cargo:
        raise PluginError(
            "cargo",
            "cargo not found: apt-get install rustc cargo libstd-rust-dev-wasm32 "
            "(or rustup with the wasm32-unknown-unknown target)",
        )
    rustc = env.get("FLUX_EDGE_RUSTC") or env.get("RUSTC")
    if not rustc and Path("/usr/bin/rustc").exists() and _DEBIAN_WASM_STD.is_dir():
        # A rustup shim earlier on PATH may lack the wasm32 target; Debian's rustc has it.
        rustc = "/usr/bin/rustc"
    if rustc:
        env["RUSTC"] = rustc
    return cargo, env


def _registry_flags() -> list[str]:
    registry = os.environ.get("FLUX_EDGE_CARGO_REGISTRY")
    if registry is None:
        registry = str(_DEBIAN_REGISTRY) if _DEBIAN_REGISTRY.is_dir() else ""
    if not registry:
        return []
    return [
        "--config",
        'source.crates-io.replace-with="debian-packages"',
        "--config",
        f"source.debian-packages.directory={json.dumps(registry)}",
        "--config",
        "net.offline=true",
    ]


def _build_rust(directory: Path) -> Path:
    name = _crate_name(directory)
    manifest = directory / "Cargo.toml"
    cargo, env = _cargo()
    cmd = [
        cargo,
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--message-format=json-render-diagnostics",
        "--manifest-path",
        str(manifest),
        *_registry_flags(),
    ]
    proc = _run(name, cmd, directory, env)
    artifact: Path | None = None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        if Path(msg.get("manifest_path", "")).resolve() != manifest:
            continue
        for f in msg.get("filenames", []):
            if f.endswith(".wasm"):
                artifact = Path(f)
    if artifact is None or not artifact.is_file():
        raise PluginError(
            name,
            'cargo built no .wasm module: the crate needs [lib] crate-type = ["cdylib"]',
        )
    wasm = directory / f"{name}.wasm"
    shutil.copyfile(artifact, wasm)
    return wasm


def _clang() -> str:
    clang = os.environ.get("FLUX_EDGE_CLANG") or shutil.which("clang-14") or shutil.which("clang")
    if not clang:
        raise PluginError("clang", "clang not found: apt-get install clang-14 lld-14")
    return clang


def _build_c(directory: Path, sources: Sequence[Path]) -> Path:
    name = directory.name
    wasm = directory / f"{name}.wasm"
    includes = ["-I", str(directory)]
    if not (directory / "flux_plugin.h").is_file():
        includes += ["-I", str(sdk_dir() / "c")]
    cmd = [_clang(), *C_FLAGS, *includes, "-o", str(wasm), *(str(s) for s in sources)]
    _run(name, cmd, directory, dict(os.environ))
    return wasm


def _run(
    name: str, cmd: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    tool = Path(cmd[0]).name
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise PluginError(name, f"{tool} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise PluginError(name, f"{tool} ran longer than {BUILD_TIMEOUT_S:g} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.rstrip().splitlines()[-_TAIL_LINES:])
        if "wasm-ld" in tail and ("not found" in tail or "No such file" in tail):
            tail += "\n(hint: apt-get install lld-14 for the wasm linker)"
        raise PluginError(name, f"{tool} failed (exit {proc.returncode}):\n{tail}")
    return proc


# --- the manifest ---------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.toml"
_CRATE_PREFIX = re.compile(r"^flux-edge (?:[a-z]+ )?plugin: ")


def make_manifest(directory: Path, module: mf.Module, default_name: str) -> mf.Manifest:
    """The manifest of the plugin in ``directory``: ``manifest.toml`` (the keys of
    docs/plugin-abi.md, "Manifest"), with what it leaves out taken from the source:

    - ``name``: the crate's lib name / the C folder's name; ``version``, ``description``,
      ``license`` (and ``homepage``): the ``[package]`` table of ``Cargo.toml``;
    - ``kind``: from the exports (``flux_process`` -> decode, ``flux_act`` -> action); a
      ``kind`` that disagrees with them is an error;
    - ``abi``: 1; ``example``: the contents of ``sample-config.toml``;
    - ``config``: ``{type = "object"}`` (any table) when there is no ``[config]`` schema.
    """
    data: dict[str, object] = {}
    path = directory / MANIFEST_FILE
    if path.is_file():
        try:
            data = dict(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PluginError(default_name, f"cannot read {path}: {exc}") from exc
    else:
        print(
            f"note: {path} is missing: the manifest says only what the build can tell "
            "(add one to document and check the plugin's config)",
            file=sys.stderr,
        )
    package: dict[str, object] = {}
    cargo = directory / "Cargo.toml"
    if cargo.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raw = tomllib.loads(cargo.read_text(encoding="utf-8")).get("package", {})
            package = raw if isinstance(raw, dict) else {}
    for key in ("version", "description", "license", "homepage"):
        if key not in data and isinstance(package.get(key), str):
            data[key] = package[key]
    if isinstance(data.get("description"), str):  # "flux-edge plugin: X" in a crate says "X"
        data["description"] = _CRATE_PREFIX.sub("", str(data["description"]), count=1)
    data.setdefault("name", default_name)
    data.setdefault("version", "0.1.0")
    data.setdefault("description", "")
    data.setdefault("license", "")
    data.setdefault("abi", mf.ABI_VERSION)
    exported = [k for k, e in mf.KIND_EXPORTS.items() if module.exports.get(e) == "func"]
    data.setdefault("kind", exported[0] if len(exported) == 1 else exported)
    sample = directory / "sample-config.toml"
    if "example" not in data and sample.is_file():
        data["example"] = sample.read_text(encoding="utf-8")
    data.setdefault("config", {"type": "object"})
    try:
        manifest = mf.manifest_from_data(data)
    except mf.ManifestError as exc:
        raise PluginError(default_name, f"{path}: {exc}") from exc
    problems = mf.check_exports(manifest, module)
    if manifest.name != default_name:
        problems.append(
            f'name "{manifest.name}" differs from the module\'s file name "{default_name}.wasm"'
        )
    if problems:
        raise PluginError(default_name, f"{path}: " + "; ".join(problems))
    return manifest


def embed_manifest(directory: Path, wasm: Path) -> mf.Manifest:
    """Write the manifest of the plugin in ``directory`` into the module ``wasm`` (in place)."""
    try:
        data = wasm.read_bytes()
        module = mf.read_module(data)
    except (OSError, mf.ManifestError) as exc:
        raise PluginError(wasm.stem, f"cannot read the built module {wasm}: {exc}") from exc
    manifest = make_manifest(directory, module, wasm.stem)
    try:
        wasm.write_bytes(mf.embed_section(data, mf.SECTION, manifest.encode()))
    except OSError as exc:
        raise PluginError(wasm.stem, f"cannot write {wasm}: {exc}") from exc
    return manifest


# --- python -m flux_edge.plugins.tooling (used by plugins/build-all.sh) ---------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_edge.plugins.tooling")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_new = sub.add_parser("new", help="scaffold a plugin")
    p_new.add_argument("name")
    p_new.add_argument("--lang", choices=("rust", "c"), default="rust")
    p_new.add_argument("--dest", type=Path, default=Path("."))
    p_build = sub.add_parser("build", help="build a plugin folder")
    p_build.add_argument("directory", type=Path)
    p_build.add_argument("--out", type=Path, default=None)
    p_embed = sub.add_parser(
        "embed-manifest", help="write DIR/manifest.toml into a module built another way"
    )
    p_embed.add_argument("directory", type=Path)
    p_embed.add_argument("wasm", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "new":
            lang: Lang = "c" if args.lang == "c" else "rust"
            print(new_plugin(args.name, lang, args.dest))
        elif args.cmd == "embed-manifest":
            embed_manifest(args.directory.resolve(), args.wasm)
            print(args.wasm)
        else:
            print(build_plugin(args.directory, args.out))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
