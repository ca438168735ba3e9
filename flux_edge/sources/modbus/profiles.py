"""Device profiles (reusable register maps, config/devices/*.toml) and the normalization of a Modbus
source entry: the loader calls ``normalize`` through the Modbus kinds (``kind.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from flux_edge.config.kinds import Context
from flux_edge.config.positions import _scan, parse_document
from flux_edge.config.schema import Config, DaemonConfig, _default
from flux_edge.config.validate import _BAD, _Validator
from flux_edge.config.values import Key, _suggest
from flux_edge.errors import ConfigError, Problem
from flux_edge.sources.modbus import checks
from flux_edge.sources.modbus.spec import DeviceProfile, ModbusRtuSource, ModbusTcpSource

# --- device profiles and normalization ----------------------------------------------------------


def bundled_profile_dir() -> Path:
    """Where the device profiles shipped with flux-edge live (a copy of config/devices/)."""
    return Path(__file__).resolve().parents[2] / "profiles"


def _profile_candidates(
    base_dir: Path, profile_dirs: tuple[str, ...] | list[str], ref: str
) -> list[Path]:
    if ref.endswith(".toml"):
        given = Path(ref).expanduser()
        return [given if given.is_absolute() else base_dir / given]
    dirs = [Path(d).expanduser() for d in profile_dirs]
    dirs = [d if d.is_absolute() else base_dir / d for d in dirs]
    return [d / f"{ref}.toml" for d in [*dirs, bundled_profile_dir()]]


def profile_search_paths(config: Config, profile: str) -> list[Path]:
    """The files tried for a device's ``profile``, in order: a path ending in ``.toml``
    (relative to the config file's directory), else ``<profile>.toml`` in each of
    ``daemon.profile_dirs`` (relative to the config file's directory), then in
    ``bundled_profile_dir()``."""
    return _profile_candidates(config.base_dir, config.daemon.profile_dirs, profile)


def _missing_profile(ref: str, candidates: list[Path]) -> str:
    if ref.endswith(".toml"):
        return f"profile file {candidates[0]} does not exist"
    shipped = sorted(path.stem for path in bundled_profile_dir().glob("*.toml"))
    return (
        f'profile "{ref}" not found: looked for {ref}.toml in '
        + ", ".join(str(c.parent) for c in candidates)
        + f"; {_suggest(ref, shipped)}profiles shipped with flux-edge: "
        + (", ".join(shipped) or "none")
    )


def _check_profile(file: str, text: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Validate a profile file's text: (its checked data or None, its problems)."""
    text, raw, syntax = parse_document(text, file)
    if raw is None:
        return None, syntax
    pv = _Validator(file, _scan(text), table_checks=checks.TABLE_CHECKS)
    try:
        data = pv.check(raw, DeviceProfile, ())
    except RecursionError:
        return None, [Problem(file, "", "values are nested too deeply")]
    if data is not _BAD:
        registers = data.get("registers", [])
        checks.unique_register_names(pv, registers, (), "a profile")
        if "registers" in raw and not raw["registers"]:
            pv.report(("registers",), "a profile needs at least one register", at="key")
    problems = sorted(pv.problems, key=lambda p: (p.line == 0, p.line, p.column))
    return (data if pv.errors == 0 else None), problems


def load_profile(path: str | Path) -> DeviceProfile:
    """Load one device profile file. Raises ``ConfigError`` with every problem in it."""
    file = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem(file, "", f"cannot read the profile: {exc.strerror or exc}")]
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(file, "", "the profile is not UTF-8 text")]) from exc
    data, problems = _check_profile(file, text)
    errors = [p for p in problems if p.severity == "error"]
    if data is None or errors:
        raise ConfigError(errors or problems)
    return msgspec.convert(data, DeviceProfile)


def _profile_registers(
    v: _Validator,
    candidates: list[Path],
    ref: str,
    path: Key,
    cache: dict[Path, list[dict[str, Any]] | None],
) -> list[dict[str, Any]] | None:
    """The checked register entries of profile ``ref``; None (problems reported) if unusable.
    A profile file's own problems are reported once, in that file, however many devices use it."""
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        v.report(path, _missing_profile(ref, candidates))
        return None
    key = found.resolve()
    if key not in cache:
        cache[key] = None
        try:
            text = found.read_bytes().decode("utf-8")
        except OSError as exc:
            v.report(path, f"cannot read profile {found}: {exc.strerror or exc}")
            return None
        except UnicodeDecodeError:
            v.report(path, f"profile {found} is not UTF-8 text")
            return None
        data, problems = _check_profile(str(found), text)
        v.problems.extend(problems)
        if data is not None:
            cache[key] = data["registers"]
    registers = cache[key]
    if registers is None:
        v.dirty.add(path)
    return registers


# Registers in one configuration, profiles included: 20,000 registers check in about 1 s on the
# development machine, and a gateway polling more is past what one process should carry.
MAX_REGISTERS = 50_000


def normalize(ctx: Context, sname: str, src: dict[str, Any]) -> None:
    """Bring a checked Modbus source entry to one shape (in place): ``devices`` always filled
    (the TCP shorthand becomes one device), each device's registers = its profile's map with the
    device's own entries appended (an entry of the same name replaces the profile's), and a
    device's interval/timeout of 0 replaced by the bus's."""
    v = ctx.v
    daemon = ctx.data.get("daemon", {})
    profile_dirs = daemon.get("profile_dirs", DaemonConfig().profile_dirs)
    if not v.clean(("daemon", "profile_dirs")):
        profile_dirs = ()
    # a profile file's problems are reported once, however many devices use it
    cache: dict[Path, list[dict[str, Any]] | None] = ctx.memo.setdefault("modbus.profiles", {})
    kind = src.get("type")
    cls: type[msgspec.Struct] = ModbusTcpSource if kind == "modbus_tcp" else ModbusRtuSource
    shorthand = kind == "modbus_tcp" and "devices" not in src
    if shorthand:
        src["devices"] = [
            {
                "name": src.get("device") or sname,
                "unit_id": src.get("unit_id", _default(ModbusTcpSource, "unit_id")),
                "registers": list(src.get("registers", [])),
            }
        ]
        for key in ("discover", "models", "bases"):  # SunSpec discovery, when given
            if key in src:
                src["devices"][0][key] = src[key]
    interval = src.get("interval", _default(cls, "interval"))
    timeout = src.get("timeout", _default(cls, "timeout"))
    for index, device in enumerate(src.get("devices", [])):
        path: Key = ("sources", sname, "devices", index)
        ref = device.get("profile", "")
        if ref and v.clean((*path, "profile")):
            candidates = _profile_candidates(ctx.base_dir, profile_dirs, ref)
            base = _profile_registers(v, candidates, ref, (*path, "profile"), cache)
            if base is not None:
                own = device.get("registers", [])
                replaced = {r.get("name") for r in own}
                device["registers"] = [r for r in base if r.get("name") not in replaced] + own
        total = ctx.memo.get("modbus.registers", 0) + len(device.get("registers", []))
        ctx.memo["modbus.registers"] = total
        if total > MAX_REGISTERS and not ctx.memo.get("modbus.too_many"):
            ctx.memo["modbus.too_many"] = True
            v.report(
                path,
                f"more than {MAX_REGISTERS:,} Modbus registers in one configuration (profiles "
                "included): the limit that keeps a check and a start-up within seconds; split "
                "the gateway's devices over two configurations",
                at="key",
            )
        device["interval"] = device.get("interval") or interval
        device["timeout"] = device.get("timeout") or timeout
        if (
            not shorthand
            and not ref
            and not device.get("registers")
            and not device.get("discover")
            and v.clean(path)
        ):
            v.report(
                path,
                f'device "{device.get("name", "?")}" has no registers and no profile: '
                "nothing will be read from it",
                at="key",
                warning=True,
            )
