"""The guest side of the plugin system, through real compiled modules.

- Golden cases (``plugins/**/cases/NAME.in.jsonl`` + ``NAME.config.json`` -> ``NAME.out.jsonl``)
  through ``python -m flux_edge plugin run`` and through the host library.
- Property tests: modbus_decode against an independent Python encoder of every register type and
  order; the Rust SDK's JSON output (json_normalize) and the C SDK's (plugins/sdk/c/tests/echo.c)
  against Python's own JSON; both allocators from the host's side.

The modules are built here with ``flux_edge.plugins.tooling.build_plugin`` (the Rust plugins'
``target/`` folders make later runs quick). ``_MiniPlugin`` below is a deliberately tiny ABI v1
loader: it calls ``flux_alloc``/``flux_dealloc`` directly (the allocator tests need that) and
stands in for ``flux_edge.plugins.host`` if that module is missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flux_edge.errors import PluginError
from flux_edge.plugins.tooling import build_plugin, sdk_dir
from tests.support.plugin_output import records_as_json

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
GOLDEN_PLUGINS = {
    "modbus_decode": PLUGINS / "modbus_decode",
    "json_normalize": PLUGINS / "json_normalize",
    "vedirect": PLUGINS / "vedirect",
    "sml": PLUGINS / "sml",
    "iec62056_21": PLUGINS / "iec62056_21",
    "mbus": PLUGINS / "mbus",
    "sparkplug_b": PLUGINS / "sparkplug_b",
    "sunspec": PLUGINS / "sunspec",
    "c_scale": PLUGINS / "examples" / "c_scale",
}

try:
    from flux_edge.plugins.host import PluginHost, PluginLimits
    from flux_edge.plugins.run import parse_input_line

    HAVE_HOST = True
except ImportError:  # the host side is not there yet: _MiniPlugin stands in
    HAVE_HOST = False

try:
    import flux_edge.plugins.run  # noqa: F401

    HAVE_RUN = True
except ImportError:
    HAVE_RUN = False

PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- building -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every module the tests need, freshly built."""
    out = tmp_path_factory.mktemp("wasm")
    echo_dir = out / "echo"
    echo_dir.mkdir()
    (echo_dir / "echo.c").write_bytes((sdk_dir() / "c" / "tests" / "echo.c").read_bytes())
    built: dict[str, Path] = {}
    try:
        for name, folder in GOLDEN_PLUGINS.items():
            built[name] = build_plugin(folder, out / f"{name}.wasm")
        built["echo"] = build_plugin(echo_dir)
    except PluginError as exc:
        if "not found" in str(exc):
            pytest.skip(f"plugin toolchain missing: {exc}")
        raise
    return built


_HOST: Any = None  # one PluginHost for the module: compiled modules are kept in memory


@pytest.fixture(scope="module", autouse=True)
def _shared_host() -> Iterator[None]:
    global _HOST
    if not HAVE_HOST:
        yield
        return
    with PluginHost(None) as host:
        _HOST = host
        try:
            yield
        finally:
            _HOST = None


# --- a minimal ABI v1 loader ----------------------------------------------------------------------


class _MiniPlugin:
    """One instance of a module, called through its raw exports."""

    LEVELS = ("trace", "debug", "info", "warn", "error")

    def __init__(self, path: Path, config: dict[str, Any], memory_limit: int = 16 << 20) -> None:
        self.logs: list[tuple[str, str]] = []
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=memory_limit)
        linker = wasmtime.Linker(engine)
        i32 = wasmtime.ValType.i32()
        for level in self.LEVELS:
            linker.define_func(
                "flux",
                f"log_{level}",
                wasmtime.FuncType([i32, i32], []),
                self._logger(level),
                access_caller=True,
            )
        module = wasmtime.Module.from_file(engine, str(path))
        exports = linker.instantiate(self.store, module).exports(self.store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self.fn = {}
        for name in ("flux_abi_version", "flux_alloc", "flux_dealloc", "flux_init", "flux_process"):
            f = exports[name]
            assert isinstance(f, wasmtime.Func), name
            self.fn[name] = f
        assert self.fn["flux_abi_version"](self.store) == 1
        cfg = json.dumps(config).encode()
        ptr = self.alloc(len(cfg))
        self.write(ptr, cfg)
        self.init_rc = self.fn["flux_init"](self.store, ptr, len(cfg))
        self.dealloc(ptr, len(cfg))

    def _logger(self, level: str) -> Any:
        def log(caller: wasmtime.Caller, ptr: int, n: int) -> None:
            mem = caller["memory"]
            assert isinstance(mem, wasmtime.Memory)
            self.logs.append(
                (level, bytes(mem.read(caller, ptr, ptr + n)).decode("utf-8", "replace"))
            )

        return log

    def alloc(self, size: int) -> int:
        ptr = self.fn["flux_alloc"](self.store, size)
        assert isinstance(ptr, int)
        return ptr & 0xFFFFFFFF

    def dealloc(self, ptr: int, size: int) -> None:
        self.fn["flux_dealloc"](self.store, _i32(ptr), _i32(size))

    def write(self, ptr: int, data: bytes) -> None:
        self.memory.write(self.store, data, ptr)

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n))

    def process(self, batch: bytes) -> int | bytes:
        """The output bytes, or the negative return code."""
        ptr = self.alloc(len(batch))
        assert ptr
        self.write(ptr, batch)
        try:
            packed = self.fn["flux_process"](self.store, _i32(ptr), len(batch))
        finally:
            self.dealloc(ptr, len(batch))
        assert isinstance(packed, int)
        if packed < 0:
            return packed
        out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
        return self.read(out_ptr, out_len) if out_len else b""


def _split_lines(text: str) -> list[str]:
    """JSON Lines are split at "\\n" only (str.splitlines would also cut at U+0085, U+2028...,
    which JSON strings may carry unescaped)."""
    return [x for x in text.split("\n") if x.strip()]


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _payload_of(line: dict[str, Any]) -> tuple[int, bytes]:
    if "registers" in line:
        return 1, b"".join(struct.pack("<H", w) for w in line["registers"])
    if "measurement" in line:
        m = dict(line["measurement"])
        m.setdefault("unit", "")
        m.setdefault("quality", "good")
        m.setdefault("ts", line.get("ts", 0.0))
        m.setdefault("device", line.get("device", "device"))
        return 2, json.dumps(m).encode()
    if "payload_hex" in line:
        return 0, bytes.fromhex(line["payload_hex"])
    if "payload_b64" in line:
        return 0, base64.b64decode(line["payload_b64"])
    return 0, line.get("payload", "").encode()


def encode_batch(lines: list[dict[str, Any]]) -> bytes:
    """ABI v1 batch from `plugin run` input lines (an encoder independent of abi.py)."""
    out = [struct.pack("<I", len(lines))]
    for line in lines:
        kind, payload = _payload_of(line)
        device = line.get("device", "device").encode()
        topic = line.get("topic", "").encode()
        body = struct.pack(
            "<BBHd", kind, line.get("function", 0), line.get("address", 0), line.get("ts", 0.0)
        )
        body += struct.pack("<H", len(device)) + device + struct.pack("<H", len(topic)) + topic
        body += struct.pack("<I", len(payload)) + payload
        out.append(struct.pack("<I", len(body)) + body)
    return b"".join(out)


# --- running lines through a plugin (host library, or the mini loader) ----------------------------


@dataclass
class _Runner:
    """Golden-format records for `plugin run`-style input lines."""

    path: Path
    config: dict[str, Any]

    def records(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._host(lines) if HAVE_HOST else self._mini(lines)

    def init_error(self) -> str | None:
        """None if the config is accepted, else the reason the plugin gave."""
        if HAVE_HOST:
            try:
                _HOST.load(self.path.stem, self.path, PluginLimits(), self.config).close()
            except PluginError as exc:
                return str(exc)
            return None
        p = _MiniPlugin(self.path, self.config)
        errors = [m for lvl, m in p.logs if lvl == "error"]
        return None if p.init_rc == 0 else f"rc={p.init_rc}: {errors[-1] if errors else ''}"

    def _host(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        msgs = [parse_input_line(json.dumps(x)) for x in lines]
        plugin = _HOST.load(self.path.stem, self.path, PluginLimits(timeout_s=5.0), self.config)
        indices: list[int] = []
        records = plugin.process(msgs, indices=indices)
        plugin.close()
        return records_as_json(records, indices)

    def _mini(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        p = _MiniPlugin(self.path, self.config)
        assert p.init_rc == 0, p.logs
        raw = p.process(encode_batch(lines))
        assert isinstance(raw, bytes), (raw, p.logs)
        out: list[dict[str, Any]] = []
        for text in _split_lines(raw.decode()):
            o = json.loads(text)
            src = lines[o["i"]]
            device = o.get("device", src.get("device", "device"))
            if "error" in o:
                out.append({"index": o["i"], "device": device, "error": o["error"]})
            else:
                out.append(
                    {
                        "device": device,
                        "name": o["name"],
                        "value": o["value"],
                        "unit": o.get("unit", ""),
                        "quality": o.get("quality", "good"),
                        "ts": o.get("ts", src.get("ts", 0.0)),
                    }
                )
        return out


# --- golden cases ---------------------------------------------------------------------------------


def _cases() -> Iterator[Any]:
    for plugin, folder in GOLDEN_PLUGINS.items():
        for case in sorted((folder / "cases").glob("*.in.jsonl")):
            name = case.name.removesuffix(".in.jsonl")
            yield pytest.param(plugin, folder / "cases" / name, id=f"{plugin}/{name}")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in _split_lines(path.read_text(encoding="utf-8"))]


def _config_of(case: Path) -> dict[str, Any]:
    cfg = case.with_name(case.name + ".config.json")
    return json.loads(cfg.read_text(encoding="utf-8")) if cfg.exists() else {}


def test_every_plugin_has_golden_cases() -> None:
    for plugin, folder in GOLDEN_PLUGINS.items():
        cases = list((folder / "cases").glob("*.in.jsonl"))
        assert cases, plugin
        for case in cases:
            expected = case.with_name(case.name.replace(".in.jsonl", ".out.jsonl"))
            assert expected.is_file(), f"{case} has no {expected.name}"
        assert (folder / "README.md").is_file() and (folder / "sample-config.toml").is_file()


@pytest.mark.parametrize(("plugin", "case"), list(_cases()))
def test_golden_through_plugin_run(wasm: dict[str, Path], plugin: str, case: Path) -> None:
    """`python -m flux_edge plugin run PLUGIN.wasm --config NAME.config.json < NAME.in.jsonl`"""
    if not HAVE_RUN:
        pytest.skip("flux_edge.plugins.run (`flux-edge plugin run`) does not exist yet")
    cmd = [sys.executable, "-m", "flux_edge", "plugin", "run", str(wasm[plugin])]
    cfg = case.with_name(case.name + ".config.json")
    if cfg.exists():
        cmd += ["--config", str(cfg)]
    stdin = case.with_name(case.name + ".in.jsonl").read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    expected = _jsonl(case.with_name(case.name + ".out.jsonl"))
    got = [json.loads(x) for x in _split_lines(proc.stdout)]
    assert got == expected, proc.stderr
    any_error = any("error" in r for r in expected)
    assert proc.returncode == (1 if any_error else 0), proc.stderr


@pytest.mark.parametrize(("plugin", "case"), list(_cases()))
def test_golden_through_the_host(wasm: dict[str, Path], plugin: str, case: Path) -> None:
    lines = _jsonl(case.with_name(case.name + ".in.jsonl"))
    got = _Runner(wasm[plugin], _config_of(case)).records(lines)
    assert got == _jsonl(case.with_name(case.name + ".out.jsonl"))


# --- modbus_decode: property tests against an independent encoder ---------------------------------

TYPES = (
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "float32",
    "int64",
    "uint64",
    "float64",
    "string",
)
WIDTH = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}  # a string: its count
FUNCTIONS = {"holding": 3, "input": 4}
I64_MAX = 2**63 - 1


def _raw_value(draw: st.DrawFn, ty: str, count: int = 0) -> int | float | bool | bytes:
    if ty == "bool":
        return draw(st.integers(0, 0xFFFF))  # any non-zero word is true
    if ty == "string":  # `count` registers of bytes: text, damaged UTF-8, NUL/space padding
        text = st.text(max_size=2 * count).map(lambda t: t.encode()[: 2 * count])
        data = draw(text | st.binary(max_size=2 * count))
        pad = draw(st.sampled_from([b"\x00", b" "]))
        return data + pad * (2 * count - len(data))
    lo, hi = {
        "int16": (-(2**15), 2**15 - 1),
        "uint16": (0, 2**16 - 1),
        "int32": (-(2**31), 2**31 - 1),
        "uint32": (0, 2**32 - 1),
        "int64": (-(2**63), I64_MAX),
        "uint64": (0, 2**64 - 1),
    }.get(ty, (0, 0))
    if ty == "float32":
        return draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
    if ty == "float64":  # bounded so that raw * scale + offset stays finite
        return draw(st.floats(-1e300, 1e300))
    if ty in ("int64", "uint64"):  # the edges, 2^53 +- 1 and the rest
        edges = st.sampled_from([lo, hi, 2**53 - 1, 2**53, 2**53 + 1, I64_MAX, I64_MAX + 1])
        return draw(st.integers(lo, hi) | edges.filter(lambda v: lo <= v <= hi))
    return draw(st.integers(lo, hi))


def _expected(reg: dict[str, Any], raw: int | float | bool | bytes) -> Any:
    """What the plugin must emit for one register (the spec, written independently)."""
    ty = reg["type"]
    if ty == "bool":
        return raw != 0
    if isinstance(raw, bytes):  # string: trailing NULs and spaces go, bad UTF-8 is replaced
        return raw.rstrip(b"\x00 ").decode("utf-8", "replace")
    exact = reg["scale"] == 1.0 and reg["offset"] == 0.0
    if ty in ("int64", "uint64") and exact and int(raw) <= I64_MAX:
        return int(raw)  # the exact integer, even beyond 2^53
    return float(raw) * reg["scale"] + reg["offset"]


def _words(ty: str, raw: int | float | bool | bytes, byte_order: str, word_order: str) -> list[int]:
    """Python's own encoding: the device's big-endian words, then the configured orders."""
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
    fmt |= {"int64": ">q", "uint64": ">Q", "float64": ">d"}
    if isinstance(raw, bytes):
        data = raw  # a string: first character in the high byte of the first register
    elif ty == "bool":
        data = struct.pack(">H", int(raw))
    else:
        data = struct.pack(fmt[ty], raw)
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order == "little" and ty != "string":  # word order means nothing for a string
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [struct.unpack(">H", w)[0] for w in words]


@st.composite
def register_blocks(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any]]:
    """A register map, one block of words covering it, and the values expected back."""
    function = draw(st.sampled_from(sorted(FUNCTIONS)))
    base = draw(st.integers(0, 60000))
    address = base + draw(st.integers(0, 3))  # leading words the map does not use
    regs: list[dict[str, Any]] = []
    words = [draw(st.integers(0, 0xFFFF)) for _ in range(address - base)]
    expected: list[Any] = []
    for k in range(draw(st.integers(1, 6))):
        ty = draw(st.sampled_from(TYPES))
        reg: dict[str, Any] = {
            "name": f"r{k}",
            "function": function,
            "address": address,
            "type": ty,
            "byte_order": draw(st.sampled_from(["big", "little"])),
            "word_order": draw(st.sampled_from(["big", "little"])),
            "scale": draw(st.sampled_from([1.0, 0.1, 0.01, 0.5, 2.0, -1.0, 1e-3, 3.7])),
            "offset": draw(st.sampled_from([0.0, -40.0, 273.15, 0.5])),
            "unit": draw(st.sampled_from(["", "°C", "kWh"])),
        }
        if ty in ("int64", "uint64"):  # exact integers need scale 1 and offset 0: often
            reg |= draw(st.sampled_from([{"scale": 1.0, "offset": 0.0}, {}]))
        width = WIDTH.get(ty, 0)
        if ty == "string":
            width = reg["count"] = draw(st.integers(1, 8))
        raw = _raw_value(draw, ty, width)
        words += _words(ty, raw, reg["byte_order"], reg["word_order"])
        expected.append(_expected(reg, raw))
        regs.append(reg)
        address += width + draw(st.integers(0, 2))
        words += [draw(st.integers(0, 0xFFFF)) for _ in range(address - base - len(words))]
    # a decoy of the other function at the same addresses must not be decoded
    other = "input" if function == "holding" else "holding"
    regs.append({"name": "decoy", "function": other, "address": base, "type": "uint16"})
    assume(base + len(words) <= 65536)
    line = {
        "device": "d",
        "ts": 1.5,
        "registers": words,
        "function": FUNCTIONS[function],
        "address": base,
    }
    return regs, line, expected


@PROPS
@given(block=register_blocks(), top_level=st.booleans())
def test_modbus_decode_matches_python_encoding(
    wasm: dict[str, Path],
    block: tuple[list[dict[str, Any]], dict[str, Any], list[Any]],
    top_level: bool,
) -> None:
    regs, line, expected = block
    config = {"registers": regs} if top_level else {"source": {"name": "s", "registers": regs}}
    got = _Runner(wasm["modbus_decode"], config).records([line])
    assert [r["name"] for r in got] == [r["name"] for r in regs[:-1]]
    for rec, reg, want in zip(got, regs, expected, strict=False):
        assert rec["value"] == want, (reg, rec)
        assert type(rec["value"]) is type(want)
        assert rec["unit"] == reg["unit"] and rec["ts"] == 1.5 and rec["device"] == "d"


@PROPS
@given(
    ty=st.sampled_from(["int32", "uint32", "float32", "int64", "uint64", "float64", "string"]),
    start=st.integers(0, 10),
    length=st.integers(0, 16),
)
def test_modbus_decode_needs_the_whole_span(
    wasm: dict[str, Path], ty: str, start: int, length: int
) -> None:
    regs = [{"name": "x", "address": 5, "type": ty, "count": 3}]
    width = WIDTH.get(ty, 3)
    line = {"registers": [0] * length, "function": 3, "address": start}
    got = _Runner(wasm["modbus_decode"], {"registers": regs}).records([line])
    if start <= 5 and start + length >= 5 + width:
        assert [r["name"] for r in got] == ["x"]
    else:
        assert len(got) == 1 and "no register of the map lies within" in got[0]["error"]


def test_modbus_decode_coils_are_bools(wasm: dict[str, Path]) -> None:
    regs = [
        {"name": "c0", "function": "coil", "address": 0, "type": "uint16", "scale": 10.0},
        {"name": "d2", "function": "discrete", "address": 2},
    ]
    r = _Runner(wasm["modbus_decode"], {"registers": regs})
    got = r.records(
        [
            {"registers": [1, 0, 0], "function": 1, "address": 0},
            {"registers": [0, 0, 1], "function": 2, "address": 0},
        ]
    )
    assert [(x["name"], x["value"]) for x in got] == [("c0", True), ("d2", True)]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({}, "no register map"),
        ({"registers": []}, "registers is empty"),
        (
            {"source": {"registers": [{"name": "t", "address": 1, "type": "float16"}]}},
            'source.registers[0] ("t"): type must be one of',
        ),
        (
            {"registers": [{"name": "a", "address": 1}, {"name": "b", "address": 70000}]},
            'registers[1] ("b"): address must be an integer 0..65535',
        ),
        ({"registers": [{"name": "a", "address": 65535, "type": "uint32"}]}, "runs past register"),
        ({"registers": [{"name": "a", "address": 65533, "type": "int64"}]}, "runs past register"),
        (
            {"registers": [{"name": "s", "address": 65530, "type": "string", "count": 7}]},
            "runs past register",
        ),
        (
            {
                "registers": [
                    {"name": "a", "address": 0},
                    {"name": "sn", "type": "string", "address": 1},
                ]
            },
            'registers[1] ("sn"): a string needs count 1..125 (registers, 2 bytes each), got none',
        ),
        (
            {"registers": [{"name": "sn", "type": "string", "address": 1, "count": 0}]},
            'registers[0] ("sn"): a string needs count 1..125',
        ),
        (
            {"registers": [{"name": "sn", "type": "string", "address": 1, "count": 126}]},
            'registers[0] ("sn"): a string needs count 1..125 (registers, 2 bytes each), got 126',
        ),
        (
            {"registers": [{"name": "sn", "type": "string", "address": 1, "count": "4"}]},
            'registers[0] ("sn"): a string needs count',
        ),
        ({"registers": [{"name": "a", "address": 1, "word_order": "middle"}]}, "word_order"),
        ({"registers": [{"name": "a", "address": 1, "function": "write"}]}, "function must be"),
        ({"registers": [{"address": 1}]}, "name is missing"),
        ({"registers": [{"name": "a", "address": 1, "scale": "x"}]}, "scale must be a number"),
    ],
)
def test_modbus_decode_refuses_bad_maps(
    wasm: dict[str, Path], config: dict[str, Any], needle: str
) -> None:
    err = _Runner(wasm["modbus_decode"], config).init_error()
    assert err is not None and needle in err, err


def test_json_normalize_refuses_bad_configs(wasm: dict[str, Path]) -> None:
    r = wasm["json_normalize"]
    assert _Runner(r, {"fields": [{"path": "a"}]}).init_error() is None
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "fields and each are missing or empty"),
        ({"fields": [{"path": "a", "name": "x_{index}"}]}, "{index} is only known inside each"),
        ({"fields": [{"path": "a", "name": "{name}"}]}, "{name} needs name_path"),
        ({"fields": [{"path": "a", "name": "{what}"}]}, "unknown placeholder {what}"),
        ({"fields": [{"path": "a", "map": {}}]}, "map must be a non-empty table"),
        ({"fields": [{"path": "a", "map_default": 1}]}, "map_default needs a map"),
        ({"each": [{"path": "a"}]}, "each[0]: fields is missing or empty"),
        ({"each": [{"path": "a", "fields": [{"path": "v"}], "extra": 1}]}, 'unknown key "extra"'),
        (
            {"each": [{"path": "a", "fields": [{"path": "v", "requried": 1}]}]},
            'each[0].fields[0]: unknown key "requried"',
        ),
        ({"fields": [{"path": "a"}], "keep": "a*"}, "keep must be a list of name patterns"),
        ({"fields": [{"path": "a", "requried": True}]}, 'fields[0]: unknown key "requried"'),
        ({"fields": [{"path": "a[x]"}]}, "is not an array index"),
        ({"fields": [{"name": "n"}]}, "path is missing"),
        ({"fields": [{"path": "a"}], "ts_unit": "h"}, "ts_unit must be"),
    ]
    for config, needle in cases:
        err = _Runner(r, config).init_error()
        assert err is not None and needle in err, (config, err)


# --- the Rust SDK's JSON output, through json_normalize -------------------------------------------


@PROPS
@given(
    text=st.text(),
    number=st.floats(allow_nan=False, allow_infinity=False),
    integer=st.integers(-(2**53), 2**53),
    ascii_only=st.booleans(),
)
def test_rust_sdk_writes_exact_strings_and_floats(
    wasm: dict[str, Path], text: str, number: float, integer: int, ascii_only: bool
) -> None:
    # ensure_ascii=False keeps most payloads free of escapes: json_normalize then reads them
    # with its in-place scanner instead of serde_json (both must give the same values)
    config = {"fields": [{"path": "s"}, {"path": "f"}, {"path": "i"}, {"path": "b"}]}
    payload = json.dumps(
        {"s": text, "f": number, "i": integer, "b": False}, ensure_ascii=ascii_only
    )
    got = _Runner(wasm["json_normalize"], config).records([{"payload": payload, "ts": 2.0}])
    values = {r["name"]: r["value"] for r in got}
    assert values == {"s": text, "f": number, "i": float(integer), "b": False}
    assert type(values["f"]) is float and type(values["i"]) is float


def test_rust_native_unit_tests() -> None:
    """The Rust SDK's and json_normalize's own unit tests, natively: among them the output
    writer's floats against Ryu on 200,000 values and json_normalize's in-place scanner against
    its serde_json path on 20,000 random and damaged documents."""
    from flux_edge.plugins.tooling import _cargo, _registry_flags

    try:
        cargo, env = _cargo()
    except PluginError as exc:
        pytest.skip(f"plugin toolchain missing: {exc}")
    env.setdefault("CARGO_TARGET_DIR", str(PLUGINS / "target"))  # shared with the wasm builds
    manifest = PLUGINS / "json_normalize" / "Cargo.toml"
    cmd = [cargo, "test", "--lib", "--manifest-path", str(manifest), *_registry_flags()]
    cmd += ["-p", "flux-plugin-sdk", "-p", "json_normalize"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "floats_match_ryu_text ... ok" in proc.stdout
    assert "scanner_agrees_on_random_documents ... ok" in proc.stdout


@pytest.mark.parametrize(
    "plugin", ["vedirect", "sml", "iec62056_21", "mbus", "sparkplug_b", "sunspec"]
)
def test_converter_native_unit_tests(plugin: str) -> None:
    """Each converter's own unit tests, natively: among them 20,000 damaged or random inputs
    that must not panic (a panic in the module would trap)."""
    from flux_edge.plugins.tooling import _cargo, _registry_flags

    try:
        cargo, env = _cargo()
    except PluginError as exc:
        pytest.skip(f"plugin toolchain missing: {exc}")
    env.setdefault("CARGO_TARGET_DIR", str(PLUGINS / "target"))
    manifest = PLUGINS / plugin / "Cargo.toml"
    cmd = [cargo, "test", "--lib", "--manifest-path", str(manifest), *_registry_flags()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "never_panics_on_noise ... ok" in proc.stdout


# --- the C SDK, through the echo fixture ----------------------------------------------------------


def _echo(wasm: dict[str, Path], topic: str, payload: bytes, config: Any = None) -> list[Any]:
    p = _MiniPlugin(wasm["echo"], config or {})
    raw = p.process(encode_batch([{"topic": topic, "payload_hex": payload.hex(), "ts": 7.5}]))
    assert isinstance(raw, bytes), p.logs
    return [json.loads(x) for x in _split_lines(raw.decode("utf-8"))]


@PROPS
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=40))
def test_c_sdk_floats_within_15_digits(wasm: dict[str, Path], values: list[float]) -> None:
    out = _echo(wasm, "f64", b"".join(struct.pack("<d", v) for v in values))
    for v, line in zip(values, out, strict=True):
        got = line["value"]
        assert type(got) is float
        if v == 0:
            assert got == 0 and math.copysign(1, got) == math.copysign(1, v)
        else:
            assert abs(got - v) <= 1e-14 * abs(v), (v, got)


@PROPS
@given(
    mantissa=st.integers(1, 10**15 - 1),
    exponent=st.integers(-320, 290),
    negative=st.booleans(),
)
def test_c_sdk_prints_short_decimals_back_exactly(
    wasm: dict[str, Path], mantissa: int, exponent: int, negative: bool
) -> None:
    v = float(f"{'-' if negative else ''}{mantissa}e{exponent}")
    assume(v != 0 and math.isfinite(v) and abs(v) >= 2.2250738585072014e-308)  # normal doubles
    (line,) = _echo(wasm, "f64", struct.pack("<d", v))
    assert line["value"] == v


def test_c_sdk_special_floats(wasm: dict[str, Path]) -> None:
    vals = [21.0, 0.1, 1e21, 1e-7, 1.7976931348623157e308, 5e-324, float("nan"), float("-inf")]
    out = _echo(wasm, "f64", b"".join(struct.pack("<d", v) for v in vals))
    assert [x.get("value") for x in out[:6]] == [
        21.0,
        0.1,
        1e21,
        1e-7,
        1.79769313486231e308,
        5e-324,
    ]
    assert out[6]["error"].startswith('measurement "v": value nan is not a finite number')
    assert "value -inf" in out[7]["error"]


@PROPS
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20))
def test_c_sdk_integers(wasm: dict[str, Path], values: list[int]) -> None:
    out = _echo(wasm, "i64", b"".join(struct.pack("<q", v) for v in values))
    assert [x["value"] for x in out] == values


@PROPS
@given(data=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_c_sdk_escapes_strings_and_replaces_bad_utf8(wasm: dict[str, Path], data: bytes) -> None:
    assume(b"\xef\xbf\xbd" not in data)
    (line,) = _echo(wasm, "str", data)
    assert line["quality"] == "bad" and line["device"] == 'dev"ice' and line["ts"] == 7.5
    got = line["value"]
    assert got.replace("\ufffd", "") == data.decode("utf-8", "ignore")
    try:
        assert got == data.decode("utf-8")
    except UnicodeDecodeError:
        assert "\ufffd" in got


def test_c_sdk_error_lines_are_capped(wasm: dict[str, Path]) -> None:
    short = b'bad "frame"\n\tat \\ 0x01'
    assert _echo(wasm, "err", short) == [{"i": 0, "error": short.decode()}]
    (line,) = _echo(wasm, "err", "é".encode() * 20000)
    assert line["error"].endswith("…[truncated]") and len(line["error"]) < 11000


def test_c_sdk_config_lookups(wasm: dict[str, Path]) -> None:
    config = {
        "text": 'a"\\\u00e9\n\U0001f600',
        "num": -1.25e-3,
        "flag": True,
        "nested": {"list": [1, {"deep": {"x": 0}}], "deep": {"x": 42.5, "y": "z"}},
        "missing": None,
    }
    out = {x["name"]: x["value"] for x in _echo(wasm, "cfg", b"", config)}
    assert out == {
        "num": -1.25e-3,
        "text": config["text"],
        "flag": True,
        "x": 42.5,
        "has_missing": False,
    }
    assert {x["name"] for x in _echo(wasm, "cfg", b"", {"num": "1"})} == {"has_missing"}


# --- both allocators, from the host's side --------------------------------------------------------


@PROPS
@given(
    plugin=st.sampled_from(["modbus_decode", "echo"]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 70000) | st.integers(0, 64)), max_size=40),
)
def test_allocators_give_disjoint_aligned_blocks(
    wasm: dict[str, Path], plugin: str, ops: list[tuple[bool, int]]
) -> None:
    config = {"registers": [{"name": "a", "address": 0}]} if plugin == "modbus_decode" else {}
    p = _MiniPlugin(wasm[plugin], config)
    live: dict[int, tuple[int, int]] = {}  # ptr -> (size, fill byte)
    for k, (free, size) in enumerate(ops):
        if free and live:
            ptr = sorted(live)[size % len(live)]
            n, fill = live.pop(ptr)
            assert p.read(ptr, n) == bytes([fill]) * n
            p.dealloc(ptr, n)
            continue
        ptr = p.alloc(size)
        assert ptr != 0 and ptr % 8 == 0
        for q, (n, _) in live.items():
            assert ptr + max(size, 1) <= q or q + max(n, 1) <= ptr, "overlapping blocks"
        fill = k % 251 + 1
        p.write(ptr, bytes([fill]) * size)
        live[ptr] = (size, fill)
    for ptr, (n, fill) in live.items():
        assert p.read(ptr, n) == bytes([fill]) * n
    # the plugin still works with all that going on
    line = {"registers": [7, 0, 0, 0], "function": 3, "address": 0, "topic": "i64"}
    ok = p.process(encode_batch([line]))
    assert isinstance(ok, bytes) and ok


@pytest.mark.parametrize("plugin", ["modbus_decode", "json_normalize", "echo"])
def test_allocators_report_exhaustion_with_zero(wasm: dict[str, Path], plugin: str) -> None:
    config = {"registers": [{"name": "a", "address": 0}], "fields": [{"path": "a"}]}
    p = _MiniPlugin(wasm[plugin], config, memory_limit=4 << 20)
    assert p.alloc(8 << 20) == 0
    assert p.alloc(0x7FFFFFFF) == 0
    assert p.alloc(1024) != 0


@pytest.mark.parametrize("plugin", ["modbus_decode", "echo"])
def test_broken_batches_fail_as_a_whole(wasm: dict[str, Path], plugin: str) -> None:
    config = {"registers": [{"name": "a", "address": 0}]}
    p = _MiniPlugin(wasm[plugin], config)
    good = encode_batch([{"registers": [1, 0, 0, 0], "function": 3, "address": 0, "topic": "i64"}])
    assert p.process(good[:-1]) == -1  # the last message runs past the batch
    assert p.process(b"") == -1
    assert p.logs[-1][0] == "error" and "malformed input batch" in p.logs[-1][1]
    # a message whose inner lengths lie is an error line; the next message still runs
    bad = bytearray(good[4:])
    bad[4 + 12 : 4 + 14] = struct.pack("<H", 500)  # device_len past the message
    batch = struct.pack("<I", 2) + bytes(bad) + good[4:]
    out = p.process(batch)
    assert isinstance(out, bytes)
    lines = [json.loads(x) for x in _split_lines(out.decode())]
    assert lines[0]["i"] == 0 and "malformed input message" in lines[0]["error"]
    assert all(x["i"] == 1 for x in lines[1:]) and len(lines) > 1
    assert p.process(struct.pack("<I", 0)) == b""  # no messages: (0 << 32) | 0


# --- vedirect: fuzz and properties ------------------------------------------------------------


def _ve_block(lines: list[tuple[str, str]]) -> bytes:
    body = b"".join(b"\r\n" + k.encode() + b"\t" + v.encode() for k, v in lines)
    body += b"\r\nChecksum\t"
    return body + bytes([(-sum(body)) % 256])


def _ve_run(wasm: dict[str, Path], payload: bytes) -> list[dict[str, Any]]:
    line = {"device": "ve", "ts": 1.0, "payload_b64": base64.b64encode(payload).decode()}
    return _Runner(wasm["vedirect"], {}).records([line])


@PROPS
@given(
    v=st.integers(-(2**31), 2**31 - 1),
    i=st.integers(-(10**6), 10**6),
    soc=st.integers(0, 1000),
    load=st.booleans(),
    pid=st.integers(0, 0xFFFF),
)
def test_vedirect_decodes_random_values(
    wasm: dict[str, Path], *, v: int, i: int, soc: int, load: bool, pid: int
) -> None:
    block = _ve_block(
        [("PID", f"0x{pid:04X}"), ("V", str(v)), ("I", str(i)), ("SOC", str(soc)),
         ("LOAD", "ON" if load else "OFF"), ("AR", str(soc))]
    )  # fmt: skip
    got = {o["name"]: o["value"] for o in _ve_run(wasm, block) if "name" in o}
    assert got == {
        "product_id": f"0x{pid:04X}",
        "battery_voltage": v / 1000,
        "battery_current": i / 1000,
        "soc": soc / 10,
        "load_on": load,
        "alarm_reason": soc,
    }


@PROPS
@given(data=st.data())
def test_vedirect_fuzz_damaged_blocks_and_noise(wasm: dict[str, Path], data: st.DataObject) -> None:
    block = _ve_block([("V", "12800"), ("I", "-1500"), ("PID", "0xA053"), ("H19", "1234")])
    damaged = bytearray(block)
    at = data.draw(st.integers(0, len(block) - 1))
    damaged[at] ^= data.draw(st.integers(1, 255))
    noise = data.draw(st.binary(max_size=300))
    # a single damaged byte always breaks the sum: never a measurement from that block
    out = _ve_run(wasm, bytes(damaged))
    assert out and all("error" in o for o in out), out
    # noise, before a block too, never traps or breaks the ABI (it may hide that block)
    _ve_run(wasm, noise)
    _ve_run(wasm, noise + block)
    assert [o["name"] for o in _ve_run(wasm, block + b":A0102000543\n" + block)][-4:] == [
        "battery_voltage", "battery_current", "product_id", "yield_total"
    ]  # fmt: skip


# --- sml: fuzz and properties -----------------------------------------------------------------


def _load_encoder(plugin: str) -> Any:
    """A plugin's spec-written encoder (plugins/NAME/cases/make_cases.py), which also wrote its
    golden inputs."""
    import importlib.util

    path = PLUGINS / plugin / "cases" / "make_cases.py"
    spec = importlib.util.spec_from_file_location(f"make_cases_{plugin}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SML = _load_encoder("sml")


def _bytes_run(wasm: dict[str, Path], plugin: str, payload: bytes, config: Any = None) -> list[Any]:
    line = {"device": "d", "ts": 1.0, "payload_b64": base64.b64encode(payload).decode()}
    return _Runner(wasm[plugin], config or {}).records([line])


def test_sml_crc_is_x25() -> None:
    assert SML.crc16(b"123456789") == 0x906E  # the CRC-16/X-25 check value


@PROPS
@given(
    energy=st.integers(0, 2**39 - 1),
    power=st.integers(-(2**31), 2**31 - 1),
    scaler=st.integers(-6, 3),
    unit=st.sampled_from([27, 30, 33, 35, 44, 9, 13]),
    count=st.integers(0, 2**63 - 1),
    flag=st.booleans(),
    size=st.integers(5, 8),
)
def test_sml_decodes_random_values(
    wasm: dict[str, Path], *, energy: int, power: int, scaler: int, unit: int, count: int,
    flag: bool, size: int,
) -> None:  # fmt: skip
    units = {27: "W", 30: "Wh", 33: "A", 35: "V", 44: "Hz", 9: "°C", 13: "m³"}
    server = b"\x0a\x01ABC\x00\x00\x00\x00\x01"
    entries = [
        SML.entry(SML.obis(1, 0, 1, 8, 0), SML.uint(energy, size), unit=30, scaler=scaler),
        SML.entry(SML.obis(1, 0, 16, 7, 0), SML.sint(power, 4), unit=unit, scaler=scaler),
        SML.entry(SML.obis(1, 0, 96, 5, 0), SML.uint(count, 8)),
        SML.entry(SML.obis(1, 0, 97, 97, 0), SML.boolean(flag)),
    ]
    raw = SML.frame([SML.get_list(b"\x00\x01", server, entries)])
    got = {o["name"]: (o["value"], o["unit"]) for o in _bytes_run(wasm, "sml", raw)}

    def scaled(v: int) -> float:
        return v / 10**-scaler if scaler < 0 else float(v * 10**scaler)

    assert got == {
        "energy_import": (scaled(energy), "Wh"),
        "power": (scaled(power), units[unit]),
        "status": (count, ""),
        "obis_1_0_97_97_0": (flag, ""),
    }


@PROPS
@given(data=st.data())
def test_sml_fuzz_damaged_frames_and_noise(wasm: dict[str, Path], data: st.DataObject) -> None:
    good = SML.ehz(83916488, 2012, 1635)
    # any damaged byte breaks the frame CRC (or its framing): errors only, never a measurement
    damaged = bytearray(good)
    at = data.draw(st.integers(0, len(good) - 1))
    damaged[at] ^= data.draw(st.integers(1, 255))
    out = _bytes_run(wasm, "sml", bytes(damaged))
    assert out and all("error" in o for o in out), out
    # random bytes, alone and before a good frame, never trap or break the ABI
    noise = data.draw(st.binary(max_size=400))
    _bytes_run(wasm, "sml", noise)
    _bytes_run(wasm, "sml", noise + SML.START + noise)
    # random message data in a frame with a valid CRC reaches the SML parser itself
    body = data.draw(
        st.binary(max_size=300)
        | st.builds(lambda b, k: good[8:-8][:k] + b, st.binary(max_size=40), st.integers(0, 300))
    )
    for crc in ("check", "ignore"):
        out = _bytes_run(wasm, "sml", SML.frame([body]), {"crc": crc})
        assert all(("error" in o) or ("name" in o) for o in out)
    names = [o.get("name") for o in _bytes_run(wasm, "sml", noise[:3] + good)]
    assert names[-6:] == [
        "energy_import", "energy_export", "power", "voltage_l1", "current_l1", "frequency"
    ]  # fmt: skip


# --- iec62056_21: fuzz and properties ------------------------------------------------------------

IEC = _load_encoder("iec62056_21")


@PROPS
@given(
    values=st.lists(
        st.tuples(
            st.integers(0, 10**9),
            st.integers(0, 6),
            st.sampled_from(["kWh", "kW", "V", "A", "Hz", "kvarh", ""]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    framed=st.booleans(),
    parity=st.booleans(),
)
def test_iec62056_21_decodes_random_values(
    wasm: dict[str, Path], values: list[tuple[int, int, str, bool]], framed: bool, parity: bool
) -> None:
    lines, expected = [], []
    for k, (digits, decimals, unit, neg) in enumerate(values):
        text = f"{'-' if neg else ''}{digits // 10**decimals}"
        if decimals:
            text += f".{digits % 10**decimals:0{decimals}d}"
        star = f"*{unit}" if unit else ""
        lines.append(f"1-0:99.{k}.0*255({text}{star})")
        plain = unit == "" and decimals == 0
        expected.append((f"obis_99_{k}_0", int(text) if plain else float(text), unit))
    raw = (IEC.mode_c if framed else IEC.mode_d)("ABC5TEST", lines)
    raw = IEC.even_parity(raw) if parity else raw
    got = [(o["name"], o["value"], o["unit"]) for o in _bytes_run(wasm, "iec62056_21", raw)]
    assert got == [("ident", "ABC5TEST", ""), *expected]
    assert all(type(g[1]) is type(e[1]) for g, e in zip(got[1:], expected, strict=True))


@PROPS
@given(data=st.data())
def test_iec62056_21_fuzz_damaged_readouts_and_noise(
    wasm: dict[str, Path], data: st.DataObject
) -> None:
    good = IEC.mode_c("ISk5MT174-0001", IEC.MT174)
    stx = good.index(IEC.STX)
    # any damaged byte from STX on breaks the BCC or the framing: errors only (bit 7 is the
    # parity bit, cleared on input, so only bits 0-6 are damaged)
    damaged = bytearray(good)
    at = data.draw(st.integers(stx, len(good) - 1))
    damaged[at] ^= data.draw(st.integers(1, 127))
    out = _bytes_run(wasm, "iec62056_21", bytes(damaged))
    assert out and all("error" in o for o in out), (at, out)
    noise = data.draw(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
    _bytes_run(wasm, "iec62056_21", noise)
    _bytes_run(wasm, "iec62056_21", b"/" + noise + b"!\r\n")
    _bytes_run(wasm, "iec62056_21", IEC.mode_d("ABC5X", [noise.decode("latin-1")]))
    lead = bytes(c for c in noise[:5] if c & 0x7F != ord("/"))  # noise, not a new "/" line
    names = [o.get("name") for o in _bytes_run(wasm, "iec62056_21", lead + good)]
    assert names[-4:] == ["energy_import_t1", "energy_import_t2", "energy_export", "error_register"]


# --- mbus: fuzz and properties ----------------------------------------------------------------

MBUS = _load_encoder("mbus")


def test_mbus_published_example_checksum() -> None:
    frame = MBUS.PUBLISHED
    assert frame[-2] == sum(frame[4:-2]) % 256 == 0x18 and frame[1] == len(frame) - 6


@PROPS
@given(
    value=st.integers(-(2**31), 2**31 - 1),
    vif=st.integers(0, 7),
    width=st.sampled_from([1, 2, 3, 4, 6, 8]),
    digits=st.integers(0, 10**8 - 1),
    storage=st.integers(0, 31),
    tariff=st.integers(0, 3),
    real=st.floats(width=32, allow_nan=False, allow_infinity=False),
)
def test_mbus_decodes_random_records(
    wasm: dict[str, Path], *, value: int, vif: int, width: int, digits: int, storage: int,
    tariff: int, real: float,
) -> None:  # fmt: skip
    value = max(-(2 ** (8 * width - 1)), min(value, 2 ** (8 * width - 1) - 1))
    dif_len = {1: 1, 2: 2, 3: 3, 4: 4, 6: 6, 8: 7}[width]
    # storage: bit 0 in the DIF, the next 4 bits in the DIFE; tariff in the DIFE
    dif = 0x80 | dif_len | ((storage & 1) << 6)
    dife = bytes([((storage >> 1) & 15) | (tariff << 4)])
    records = [
        MBUS.record(dif, bytes([vif]), MBUS.i(value, width), dife=dife),  # energy 10^(vif-3) Wh
        MBUS.record(0x0C, b"\x13", MBUS.bcd(digits, 4)),  # volume, litres
        MBUS.record(0x05, b"\x2b", struct.pack("<f", real)),  # power, W
    ]
    frame = MBUS.rsp_ud(records, MBUS.long_header(1, "ABC", 1, 2, 3))
    got = [(o["name"], o["value"], o["unit"]) for o in _bytes_run(wasm, "mbus", frame)]
    exp = vif - 3
    energy = value / 10**-exp if exp < 0 else float(value * 10**exp)
    suffix = (f"_s{storage}" if storage else "") + (f"_t{tariff}" if tariff else "")
    assert got == [
        (f"energy{suffix}", energy, "Wh"),
        ("volume", digits / 1000, "m³"),
        ("power", real, "W"),
    ]


@PROPS
@given(data=st.data())
def test_mbus_fuzz_damaged_frames_and_noise(wasm: dict[str, Path], data: st.DataObject) -> None:
    good = MBUS.rsp_ud(MBUS.HEAT, MBUS.long_header(12345678, "KAM", 1, 4, 17))
    damaged = bytearray(good)
    at = data.draw(st.integers(0, len(good) - 1))
    damaged[at] ^= data.draw(st.integers(1, 255))
    out = _bytes_run(wasm, "mbus", bytes(damaged))
    assert out and all("error" in o for o in out), (at, out)
    noise = data.draw(st.binary(max_size=300))
    _bytes_run(wasm, "mbus", noise)
    # random records inside a frame whose checksum is right reach the record parser
    for header in (b"", bytes(4), MBUS.long_header(1, "ABC", 1, 2, 3)):
        out = _bytes_run(wasm, "mbus", MBUS.rsp_ud([noise[:240]], header))
        assert all(("error" in o) or ("name" in o) for o in out)
    names = [o.get("name") for o in _bytes_run(wasm, "mbus", b"\xe5" + good)]
    assert names[-2:] == ["energy_t1", "error_flags"]


# --- sparkplug_b: fuzz and properties ---------------------------------------------------------

SPB = _load_encoder("sparkplug_b")

_SPB_TYPES = {
    SPB.INT8: st.integers(-(2**7), 2**7 - 1),
    SPB.INT16: st.integers(-(2**15), 2**15 - 1),
    SPB.INT32: st.integers(-(2**31), 2**31 - 1),
    SPB.INT64: st.integers(-(2**63), 2**63 - 1),
    SPB.UINT8: st.integers(0, 2**8 - 1),
    SPB.UINT16: st.integers(0, 2**16 - 1),
    SPB.UINT32: st.integers(0, 2**32 - 1),
    SPB.UINT64: st.integers(0, 2**63 - 1),
    SPB.FLOAT: st.floats(width=32, allow_nan=False, allow_infinity=False),
    SPB.DOUBLE: st.floats(allow_nan=False, allow_infinity=False),
    SPB.BOOLEAN: st.booleans(),
    SPB.STRING: st.text(),
}


def _spb_run(wasm: dict[str, Path], lines: list[tuple[str, bytes]]) -> list[Any]:
    rows = [
        {"device": "b", "ts": 1.0, "topic": t, "payload_b64": base64.b64encode(p).decode()}
        for t, p in lines
    ]
    return _Runner(wasm["sparkplug_b"], {"online": False}).records(rows)


@PROPS
@given(
    metrics=st.lists(
        st.sampled_from(sorted(_SPB_TYPES)).flatmap(
            lambda t: st.tuples(st.just(t), _SPB_TYPES[t], st.integers(0, 2**64 - 1))
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda m: m[2],
    ),
    ts=st.integers(0, 2**42),
)
def test_sparkplug_b_decodes_random_metrics(
    wasm: dict[str, Path], metrics: list[tuple[int, Any, int]], ts: int
) -> None:
    birth = SPB.payload(
        ts, [SPB.metric(v, t, f"m{k}", alias=a) for k, (t, v, a) in enumerate(metrics)]
    )
    data = SPB.payload(ts + 1, [SPB.metric(v, t, alias=a) for t, v, a in metrics])
    out = _spb_run(wasm, [("spBv1.0/g/NBIRTH/e", birth), ("spBv1.0/g/NDATA/e", data)])

    def expect(t: int, v: Any) -> Any:
        if t == SPB.FLOAT:  # the f32's shortest decimal that reads back as the same f32
            f32 = struct.unpack("<f", struct.pack("<f", v))[0]
            for digits in range(1, 10):
                text = f"{f32:.{digits}g}"
                with contextlib.suppress(OverflowError):  # rounded past the f32 range
                    if struct.unpack("<f", struct.pack("<f", float(text)))[0] == f32:
                        return float(text)
        return v

    want = [(f"m{k}", expect(t, v)) for k, (t, v, _) in enumerate(metrics)]
    assert [(o["name"], o["value"]) for o in out] == want + want
    assert all(o["device"] == "e" for o in out)
    assert [o["ts"] for o in out] == [ts / 1000] * len(want) + [(ts + 1) / 1000] * len(want)


@PROPS
@given(data=st.data())
def test_sparkplug_b_fuzz_random_payloads(wasm: dict[str, Path], data: st.DataObject) -> None:
    noise = data.draw(st.binary(max_size=300))
    topics = ["spBv1.0/g/NBIRTH/e", "spBv1.0/g/DDATA/e/d", "spBv1.0/g/NDEATH/e", "x/y"]
    good = SPB.payload(5, [SPB.metric(1.5, SPB.DOUBLE, "a", alias=1)])
    # random bytes as a payload, as a metric, and after a good one
    lines = [(t, noise) for t in topics]
    lines += [("spBv1.0/g/NDATA/e", SPB.payload(1, [noise, noise[:7]]))]
    lines += [("spBv1.0/g/NBIRTH/e", good + noise)]
    out = _spb_run(wasm, lines)
    assert all(("error" in o) or ("name" in o) for o in out)
