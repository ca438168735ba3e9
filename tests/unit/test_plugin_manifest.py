"""flux_edge.plugins.manifest: the wasm section reader, the manifest and the schema subset."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_edge.errors import FluxError
from flux_edge.plugins import manifest as mf

HEADER = b"\0asm\x01\0\0\0"


def leb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def section(sid: int, body: bytes) -> bytes:
    return bytes([sid]) + leb(len(body)) + body


def exports(*names: str) -> bytes:
    body = leb(len(names))
    for n in names:
        raw = n.encode()
        body += leb(len(raw)) + raw + b"\0" + leb(0)
    return section(7, body)


MANIFEST: dict[str, Any] = {
    "manifest": 1,
    "name": "demo",
    "version": "1.2.3",
    "abi": 1,
    "kind": "decode",
    "description": "a demo",
    "license": "MIT",
    "config": {
        "type": "object",
        "required": ["mode"],
        "properties": {
            "mode": {"type": "string", "enum": ["fast", "slow"], "description": "how"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5},
            "ratio": {"type": "number", "exclusiveMinimum": 0},
            "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "minLength": 1}},
            "fields": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["path"],
                    "properties": {"path": {"type": "string"}, "scale": {"type": "number"}},
                },
            },
            "map": {"type": "object", "additionalProperties": {"type": ["number", "boolean"]}},
        },
    },
}


def module_with(manifest: dict[str, Any] | bytes, *names: str) -> bytes:
    payload = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return HEADER + exports(*names) + mf.custom_section(mf.SECTION, payload)


# --- the reader -----------------------------------------------------------------------------------


def test_reads_manifest_and_exports() -> None:
    data = module_with(MANIFEST, "flux_process", "memory")
    module = mf.read_module(data)
    assert module.exports == {"flux_process": "func", "memory": "func"}
    m = mf.manifest_of(data)
    assert m is not None
    assert (m.name, m.version, m.abi, m.kinds) == ("demo", "1.2.3", 1, ("decode",))
    assert m.license == "MIT"
    assert mf.check_exports(m, module) == []
    assert mf.check_exports(m, mf.read_module(HEADER + exports("flux_act"))) == [
        'the manifest says kind "decode" but the module has no flux_process',
        'the module exports flux_act but the manifest lacks kind "action"',
    ]


def test_no_manifest_is_none() -> None:
    assert mf.manifest_of(HEADER + exports("flux_process")) is None
    assert mf.manifest_of(HEADER + mf.custom_section("name", b"\x00\x01")) is None


def test_two_manifests_refused() -> None:
    data = module_with(MANIFEST) + mf.custom_section(mf.SECTION, b"{}")
    with pytest.raises(mf.ManifestError, match=r"2 flux\.manifest sections"):
        mf.manifest_of(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a WebAssembly module"),
        (b"\0asm\x02\0\0\0", "unsupported WebAssembly binary version"),
        (HEADER + b"\x00", "truncated section size"),
        (HEADER + b"\x00\x10abc", "claims 16 bytes; only 3 remain"),
        (HEADER + b"\x00\xff\xff\xff\xff\x7f", "does not fit in 32 bits"),
        (HEADER + section(0, b"\x05ab"), "custom section name at byte 11 runs past"),
        (HEADER + section(0, b"\x02\xff\xfe"), "not UTF-8"),
        (HEADER + section(7, b"\x01\x01a"), "truncated export 'a'"),
    ],
)
def test_malformed_modules(data: bytes, message: str) -> None:
    with pytest.raises(mf.ManifestError, match=message):
        mf.read_module(data)


def test_manifest_error_is_flux_error() -> None:
    assert issubclass(mf.ManifestError, FluxError)


@given(st.binary(max_size=300))
@settings(max_examples=400)
def test_random_bytes_never_crash(tail: bytes) -> None:
    for data in (tail, HEADER + tail):
        with contextlib.suppress(mf.ManifestError):
            mf.manifest_of(data)


@given(
    st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=200)), max_size=6),
    st.binary(max_size=400),
)
def test_sections_round_trip(customs: list[tuple[str, bytes]], payload: bytes) -> None:
    data = HEADER + b"".join(mf.custom_section(n, p) for n, p in customs)
    assert list(mf.read_module(data).custom) == customs
    embedded = mf.embed_section(data, mf.SECTION, payload)
    module = mf.read_module(embedded)
    assert module.sections(mf.SECTION) == [payload]
    assert [c for c in module.custom if c[0] != mf.SECTION] == [
        c for c in customs if c[0] != mf.SECTION
    ]
    # embedding again replaces, never duplicates
    again = mf.read_module(mf.embed_section(embedded, mf.SECTION, b"x"))
    assert again.sections(mf.SECTION) == [b"x"]


@given(st.integers(0, 2**32 - 1))
def test_leb_round_trip(n: int) -> None:
    encoded = mf._leb_encode(n)
    assert mf._leb_u32(encoded, 0, len(encoded), "n") == (n, len(encoded))


@given(st.data())
def test_truncated_module_is_an_error_not_a_crash(data: st.DataObject) -> None:
    whole = module_with(MANIFEST, "flux_process")
    cut = data.draw(st.integers(0, len(whole) - 1))
    try:
        got = mf.manifest_of(whole[:cut])
    except mf.ManifestError:
        return
    # a cut at a section boundary is a valid module without the manifest
    assert got is None


def test_manifest_round_trip_through_encode() -> None:
    m = mf.manifest_from_data(MANIFEST)
    again = mf.parse_manifest(m.encode())
    assert again == m
    assert json.loads(m.encode())["kind"] == "decode"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad-Name"}, "must be 1-64 characters"),
        ({"version": "1.2"}, "not a semantic version"),
        ({"abi": "1"}, 'abi must be an integer, got "1"'),
        ({"kind": "decoder"}, 'kind "decoder" is unknown; did you mean "decode"'),
        ({"kind": 3}, "kind must be"),
        ({"licence": "MIT"}, 'unknown key "licence"; did you mean "license"'),
        ({"manifest": 2}, "manifest format 2 is not supported"),
        (
            {"config": {"type": "object", "properties": {"x": {"typ": "string"}}}},
            'config.properties.x: keyword "typ" is not supported; did you mean "type"',
        ),
        (
            {"config": {"type": "object", "properties": {"x": {"type": "int"}}}},
            "config.properties.x: type must be one of",
        ),
        (
            {
                "config": {
                    "type": "object",
                    "properties": {"x": {"type": "integer", "minimum": 3, "default": 1}},
                }
            },
            "the default is refused by its own schema: 1 is out of range",
        ),
        (
            {"config": {"type": "object", "required": ["y"], "properties": {}}},
            'required names "y", which is not in properties',
        ),
        ({"config": {"type": "array"}}, 'the schema of a config table has type "object"'),
    ],
)
def test_bad_manifests(change: dict[str, Any], message: str) -> None:
    with pytest.raises(mf.ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mf.manifest_from_data({**MANIFEST, **change})


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\xff", "not UTF-8"), (b"{", "not valid JSON"), (b"[]", "must be a JSON object")],
)
def test_bad_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(mf.ManifestError, match=message):
        mf.manifest_of(module_with(payload))


# --- config validation ----------------------------------------------------------------------------

SCHEMA = MANIFEST["config"]


def issues(value: object) -> list[tuple[tuple[str | int, ...], str, str]]:
    return [(i.path, i.message, i.at) for i in mf.validate_config(SCHEMA, value)]


def test_valid_config_has_no_issues() -> None:
    cfg = {"mode": "fast", "limit": 3, "ratio": 0.5, "tags": ["a"], "fields": [{"path": "x"}],
           "map": {"ON": True, "OFF": 0}}  # fmt: skip
    assert issues(cfg) == []
    assert issues({"mode": "slow", "limit": 10.0}) == []  # an integral float is an integer


def test_every_problem_with_its_path() -> None:
    cfg = {
        "mode": "fsat",
        "limt": 3,
        "ratio": 0,
        "tags": ["", "b", "c"],
        "fields": [{"path": "a", "scael": 2}, {"scale": "x"}, 5],
        "map": {"ON": "yes"},
    }
    assert issues(cfg) == [
        (("mode",), '"fsat" is not allowed; did you mean "fast"? choose one of "fast", "slow"',
         "value"),
        (("limt",), 'unknown key "limt"; did you mean "limit"? known keys: fields, limit, map, '
         "mode, ratio, tags", "key"),
        (("ratio",), "0 is out of range: must be > 0", "value"),
        (("tags",), "3 element(s): at most 2 are allowed", "value"),
        (("tags", 0), "0 character(s): it must not be empty", "value"),
        (("fields", 0, "scael"), 'unknown key "scael"; did you mean "scale"? known keys: path, '
         "scale", "key"),
        (("fields", 1, "scale"), 'expected a number, got "x"', "value"),
        (("fields", 1), '"path" is required', "key"),
        (("fields", 2), "expected a table, got 5", "value"),
        (("map", "ON"), 'expected a number or true or false, got "yes"', "value"),
    ]  # fmt: skip


def test_required_at_top_names_description() -> None:
    assert issues({}) == [((), '"mode" is required (how)', "value")]


def test_bool_is_not_a_number_and_limits() -> None:
    assert issues({"mode": "fast", "limit": True}) == [
        (("limit",), "expected an integer, got true", "value")
    ]
    assert issues({"mode": "fast", "limit": 11}) == [
        (("limit",), "11 is out of range: must be >= 1 and <= 10", "value")
    ]
    assert issues({"mode": "fast", "ratio": float("nan")}) == [
        (("ratio",), "expected a number, got nan", "value")
    ]


def test_no_properties_accepts_any_table() -> None:
    assert mf.validate_config({"type": "object"}, {"anything": [1, {"x": 2}]}) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_validate_never_raises(value: object) -> None:
    for i in mf.validate_config(SCHEMA, value):
        assert isinstance(i.message, str) and i.message
        assert i.at in ("key", "value")


@given(
    st.sampled_from(["fast", "slow"]), st.integers(1, 10), st.lists(st.text(min_size=1), max_size=2)
)
def test_generated_valid_configs_pass(mode: str, limit: int, tags: list[str]) -> None:
    assert issues({"mode": mode, "limit": limit, "tags": tags}) == []
