"""The nmea0183 plugin, through the real compiled module.

- Golden cases (plugins/nmea0183/cases) through `python -m flux_edge plugin run` and through the
  host library (tests/integration/test_plugin_golden.py lists its plugins by hand, so this file
  runs this plugin's cases).
- Property tests: sentences built and checksummed in Python from random values decode to those
  values; any single corrupted character makes the sentence an error, never a wrong value.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_edge.errors import PluginError, PluginLoadError
from flux_edge.model import ErrorRecord, Measurement, Reading
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits
from flux_edge.plugins.run import parse_input_line
from flux_edge.plugins.tooling import build_plugin

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "plugins" / "nmea0183"
CASES = sorted((FOLDER / "cases").glob("*.in.jsonl"))
PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="session")
def nmea_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nmea") / "nmea0183.wasm"
    try:
        return build_plugin(FOLDER, out)
    except PluginError as exc:
        if "not found" in str(exc) and not os.environ.get("CI"):
            pytest.skip(f"plugin toolchain missing: {exc}")
        raise


@pytest.fixture(scope="module")
def host() -> Iterator[PluginHost]:
    with PluginHost(None) as h:
        yield h


def load(host: PluginHost, wasm: Path, config: dict[str, Any] | None = None) -> Plugin:
    return host.load("nmea0183", wasm, PluginLimits(timeout_s=5.0), config or {})


def checksum(body: str) -> str:
    return f"{functools.reduce(lambda acc, ch: acc ^ ord(ch), body, 0):02X}"


def sentence(body: str) -> str:
    return f"${body}*{checksum(body)}"


def reading(text: str | bytes, ts: float = 1.0) -> Reading:
    payload = text.encode() if isinstance(text, str) else text
    return Reading(source="gps", device="gps", ts=ts, payload=payload, topic="/dev/ttyS0")


def values(records: list[Measurement | ErrorRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records:
        assert isinstance(r, Measurement), r
        out[r.name] = r.value
    return out


# --- golden cases ---------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def _case_files(case: Path) -> tuple[Path, Path, Path]:
    stem = case.name.removesuffix(".in.jsonl")
    return case, case.with_name(f"{stem}.config.json"), case.with_name(f"{stem}.out.jsonl")


def test_the_plugin_ships_cases_readme_and_sample_config() -> None:
    assert len(CASES) >= 4
    for case in CASES:
        _, cfg, out = _case_files(case)
        assert cfg.is_file() and out.is_file(), case
    assert (FOLDER / "README.md").is_file() and (FOLDER / "sample-config.toml").is_file()
    # the sentences of the cases that are meant to be good carry correct checksums
    for name in ("gps", "marine"):
        for line in _jsonl(FOLDER / "cases" / f"{name}.in.jsonl"):
            body, _, given = line["payload"][1:].rpartition("*")
            assert given.upper() == checksum(body), line


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name.removesuffix(".in.jsonl"))
def test_golden_through_plugin_run(nmea_wasm: Path, case: Path) -> None:
    inp, cfg, out = _case_files(case)
    cmd = [sys.executable, "-m", "flux_edge", "plugin", "run", str(nmea_wasm), "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cmd, input=inp.read_text(encoding="utf-8"), capture_output=True, text=True, env=env,
        timeout=120, check=False,
    )
    expected = _jsonl(out)
    got = [json.loads(x) for x in proc.stdout.split("\n") if x.strip()]
    assert got == expected, proc.stderr
    assert proc.returncode == (1 if any("error" in r for r in expected) else 0), proc.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name.removesuffix(".in.jsonl"))
def test_golden_through_the_host(host: PluginHost, nmea_wasm: Path, case: Path) -> None:
    inp, cfg, out = _case_files(case)
    msgs = [parse_input_line(json.dumps(x)) for x in _jsonl(inp)]
    plugin = load(host, nmea_wasm, json.loads(cfg.read_text(encoding="utf-8")))
    indices: list[int] = []
    records = plugin.process(msgs, indices=indices)
    plugin.close()
    got: list[dict[str, Any]] = []
    for i, r in zip(indices, records, strict=True):
        if isinstance(r, Measurement):
            got.append({"device": r.device, "name": r.name, "value": r.value, "unit": r.unit,
                        "quality": r.quality, "ts": r.ts})
        else:
            got.append({"index": i, "device": r.device, "error": r.error})
    assert got == _jsonl(out)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"unknown": "ignore"}, 'unknown must be "skip" or "error"'),
        ({"require_checksum": "yes"}, "require_checksum must be true or false"),
        ({"sentences": ["GGA", "GSV"]}, '"GSV" is not a sentence type this plugin decodes'),
        ({"sentences": []}, "sentences is empty"),
        ({"require_checksums": False}, 'unknown key "require_checksums"'),
    ],
)
def test_bad_configs_are_refused(
    host: PluginHost, nmea_wasm: Path, config: dict[str, Any], needle: str
) -> None:
    with pytest.raises(PluginLoadError) as info:
        load(host, nmea_wasm, config)
    assert needle in str(info.value)


# --- properties -----------------------------------------------------------------------------------


def ddmm(value: float, deg_digits: int) -> str:
    """Degrees -> NMEA ddmm.mmmm (4 decimals of minutes), like receivers print it."""
    deg = int(value)
    minutes = round((value - deg) * 60, 4)
    if minutes >= 60:  # rounding carried over
        deg, minutes = deg + 1, 0.0
    return f"{deg:0{deg_digits}d}{minutes:07.4f}"


def decoded(field: str) -> float:
    """What a correct decoder makes of ddmm.mmmm: the same arithmetic, done in Python."""
    int_len = field.index(".")
    return int(field[: int_len - 2]) + float(field[int_len - 2 :]) / 60.0


@st.composite
def gga_fix(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "lat": draw(st.floats(0, 89.99)),
        "ns": draw(st.sampled_from("NS")),
        "lon": draw(st.floats(0, 179.99)),
        "ew": draw(st.sampled_from("EW")),
        "fix": draw(st.integers(0, 8)),
        "sats": draw(st.integers(0, 40)),
        "hdop": f"{draw(st.integers(0, 9999)) / 100:.2f}",
        "alt": f"{draw(st.integers(-4000, 90000)) / 10:.1f}",
        "talker": draw(st.sampled_from(["GP", "GN", "GL", "GA", "BD"])),
    }


@PROPS
@given(g=gga_fix())
def test_gga_values_round_trip(host: PluginHost, nmea_wasm: Path, g: dict[str, Any]) -> None:
    lat, lon = ddmm(g["lat"], 2), ddmm(g["lon"], 3)
    body = (f"{g['talker']}GGA,120000.00,{lat},{g['ns']},{lon},{g['ew']},{g['fix']},"
            f"{g['sats']:02d},{g['hdop']},{g['alt']},M,47.0,M,,")
    plugin = _shared(host, nmea_wasm)
    records = plugin.process([reading(sentence(body))])
    got = values(records)
    want_lat = decoded(lat) * (-1 if g["ns"] == "S" else 1)
    want_lon = decoded(lon) * (-1 if g["ew"] == "W" else 1)
    assert got == {
        "latitude": want_lat,
        "longitude": want_lon,
        "fix_quality": g["fix"],
        "satellites": g["sats"],
        "hdop": float(g["hdop"]),
        "altitude": float(g["alt"]),
        "geoid_separation": 47.0,
    }
    bad = {r.name for r in records if isinstance(r, Measurement) and r.quality == "bad"}
    assert bad == ({"latitude", "longitude", "altitude", "geoid_separation"} if g["fix"] == 0
                   else set())


_PLUGIN: dict[str, Plugin] = {}


def _shared(host: PluginHost, wasm: Path) -> Plugin:
    """One instance for all examples of a property test (loading costs ~10 ms)."""
    key = f"{id(host)}:{wasm}"
    if key not in _PLUGIN:
        _PLUGIN.clear()
        _PLUGIN[key] = load(host, wasm)
    return _PLUGIN[key]


VALID = [
    sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
    sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"),
    sentence("IIXDR,C,19.52,C,TempAir,P,1.02481,B,Barometer"),
    sentence("WIMWV,214.8,R,0.1,K,A"),
    sentence("GNVTG,31.66,T,,M,0.02,N,0.04,K,A"),
]


@PROPS
@given(
    which=st.integers(0, len(VALID) - 1),
    pos=st.integers(0, 200),
    char=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
)
def test_a_corrupted_character_is_always_an_error(
    host: PluginHost, nmea_wasm: Path, which: int, pos: int, char: str
) -> None:
    text = VALID[which]
    pos %= len(text)
    corrupted = text[:pos] + char + text[pos + 1 :]
    if corrupted[:-2] == text[:-2] and corrupted[-2:].upper() == text[-2:]:
        return  # unchanged, or the same checksum in lower case
    records = _shared(host, nmea_wasm).process([reading(corrupted)])
    assert not any(isinstance(r, Measurement) for r in records), (corrupted, records)
    if not corrupted.startswith("!"):  # "!": an encapsulated sentence, skipped as unknown
        assert len(records) == 1 and isinstance(records[0], ErrorRecord), (corrupted, records)


@PROPS
@given(data=st.binary(max_size=120))
def test_garbage_is_an_error_or_nothing_never_a_crash(
    host: PluginHost, nmea_wasm: Path, data: bytes
) -> None:
    records = _shared(host, nmea_wasm).process([reading(data), reading(VALID[0])])
    assert all(isinstance(r, ErrorRecord) for r in records[:-7])
    assert values(records[-7:])["latitude"] == pytest.approx(48.1173)


@PROPS
@given(
    groups=st.lists(
        st.tuples(
            st.sampled_from(["C", "P", "H", "U", "A"]),
            st.integers(-10**6, 10**6).map(lambda k: f"{k / 1000:.3f}") | st.just(""),
            st.sampled_from(["C", "B", "P", "V", "D", ""]),
            st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda g: g[3],
    )
)
def test_xdr_groups(
    host: PluginHost, nmea_wasm: Path, groups: list[tuple[str, str, str, str]]
) -> None:
    body = "IIXDR," + ",".join(",".join(g) for g in groups)
    got = values(_shared(host, nmea_wasm).process([reading(sentence(body))]))
    assert got == {name: float(v) for _, v, _, name in groups if v}


def test_the_sample_config_is_a_valid_site_config(tmp_path: Path, nmea_wasm: Path) -> None:
    from flux_edge.actions.serial_write import parse_write_data
    from flux_edge.actions.serial_write_kind import SerialWriteAction
    from flux_edge.kinds import check_config

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "nmea0183.wasm").write_bytes(nmea_wasm.read_bytes())
    site = tmp_path / "site.toml"
    site.write_text((FOLDER / "sample-config.toml").read_text(encoding="utf-8"))
    config, problems = check_config(site)
    assert config is not None and problems == []
    for action in config.actions.values():
        assert isinstance(action, SerialWriteAction)
        assert parse_write_data(action.data, action.encoding).endswith(b"\r\n")
