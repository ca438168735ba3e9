"""TOML configuration -> typed, frozen config. The ONE place config is validated.

Schema (the Structs below) is the contract the rest of the daemon reads. Durations are given in
TOML as strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and stored as float
seconds; sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int bytes.

Loading happens in passes, each collecting *every* problem it finds (docs/configuration.md):

1. syntax: tomlkit parses the text; a syntax error is reported with its line and column;
2. schema: the whole document is walked against the Structs (unknown keys with a suggestion,
   types deep in lists, missing keys, durations, sizes, ranges), each problem placed at the line
   and column of the offending key or value by a small position scanner (``_Scanner``), since
   tomlkit does not expose positions;
3. references: chains name plugins, plugin files exist, actions name sources (of the right kind,
   and a device of it), rules name actions, device names are unique, one source per serial port;
4. normalization: every Modbus source gets ``devices`` (the TCP single-device shorthand becomes
   one device), each device's ``profile`` file is read (its problems reported in that file) and
   its map merged with the device's own registers, a device interval/timeout of 0 becomes the
   bus's;
5. rule conditions type-check (``flux_edge.rules.engine.check_rules``);
6. the structs are built, and each RTU bus's time budget is checked (``bus_budget``).

Public API: ``load_config``, ``load_config_text``, ``check_config``, ``check_config_text``,
``resolve_plugin_path``, ``plugin_search_paths``, ``bundled_plugin_dir``, ``parse_duration``,
``parse_size``, ``source_devices``, ``load_profile``, ``profile_search_paths``,
``bundled_profile_dir``, ``bus_budget`` (-> ``BusBudget``).
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import importlib
import logging
import math
import re
import string
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
import tomlkit
import tomlkit.exceptions

from flux_edge.errors import ConfigError, FluxError, Problem

RegisterFunction = Literal["coil", "discrete", "holding", "input"]
RegisterType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
Order = Literal["big", "little"]
Parity = Literal["N", "E", "O"]


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DaemonConfig(_S, frozen=True):
    name: str = ""  # gateway id; default: the host name
    state_dir: str = "/var/lib/flux-edge"  # plugin cache lives in state_dir/cache
    plugin_dirs: tuple[str, ...] = ("plugins",)  # searched for <module>.wasm, relative to config
    profile_dirs: tuple[str, ...] = ("devices",)  # searched for <profile>.toml, relative to config
    queue_size: int = 10000  # capacity of each queue between stages
    batch_max: int = 256  # most messages per plugin call
    log_level: str = "info"
    audit_file: str = ""  # default: <state_dir>/audit.jsonl
    audit_max_size: int = 4 * 1024 * 1024  # rotate the audit log past this size
    audit_keep: int = 5  # rotated audit files kept
    # a stage busy with one unit of work longer than this counts as stuck: the systemd watchdog
    # is no longer fed, /healthz answers 503 and systemd restarts the service
    stall_timeout: float = 30.0
    shutdown_timeout: float = 20.0  # SIGTERM: longest drain (queues, actions, uplink flush)


class PluginConfig(_S, frozen=True):
    module: str = ""  # looked up as <module>.wasm in plugin_dirs, then bundled; default: table name
    file: str = ""  # explicit .wasm path (relative to the config file); excludes ``module``
    timeout: float = 0.05  # wall time per call, seconds
    memory_limit: int = 16 * 1024 * 1024  # bytes of linear memory
    max_failures: int = 3  # consecutive failed calls before quarantine
    quarantine: float = 60.0  # seconds a quarantined plugin is left alone before a retry
    wasi: bool = False  # grant WASI (no preopened dirs, no env, no args) when true
    config: dict[str, Any] = {}  # passed as JSON to the plugin's flux_init


class RegisterConfig(_S, frozen=True):
    name: str  # a CEL identifier: [A-Za-z_][A-Za-z0-9_]*
    address: int  # 0..65535
    function: RegisterFunction = "holding"
    type: RegisterType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    count: int = 0  # registers of a "string" (2 ASCII bytes each); required for strings only
    interval: float = 0.0  # poll this point on its own interval; 0 = the device's interval


class ModbusDeviceConfig(_S, frozen=True):
    """One slave (unit id) on a Modbus bus or behind a Modbus TCP endpoint/gateway."""

    name: str  # device name carried by its measurements
    unit_id: int = 1
    profile: str = ""  # a register map file: <profile>.toml in daemon.profile_dirs, or a path
    registers: tuple[RegisterConfig, ...] = ()  # after loading: the profile's map, then these
    interval: float = 0.0  # 0 = the bus's interval
    timeout: float = 0.0  # 0 = the bus's timeout


class ModbusTcpSource(_S, frozen=True, tag="modbus_tcp", tag_field="type"):
    host: str
    port: int = 502
    unit_id: int = 1  # single-device shorthand (with device/registers); or use `devices`
    interval: float = 1.0  # seconds between polls
    timeout: float = 1.0  # seconds per request
    device: str = ""  # device name for measurements; default: the source's table name
    chain: tuple[str, ...] = ()  # plugin names, applied in order
    max_gap: int = 8  # registers a coalesced read may skip over
    registers: tuple[RegisterConfig, ...] = ()
    devices: tuple[ModbusDeviceConfig, ...] = ()  # several unit ids behind one endpoint
    retries: int = 1  # extra attempts of a failed request before the device counts as failing
    backoff_max: float = 60.0  # longest pause between attempts to reach a failing device


class ModbusRtuSource(_S, frozen=True, tag="modbus_rtu", tag_field="type"):
    """An RS-485 line: one request at a time, several slaves."""

    port: str  # /dev/ttyUSB0, /dev/serial/by-id/...
    devices: tuple[ModbusDeviceConfig, ...]
    baudrate: int = 9600
    parity: Parity = "E"  # the Modbus spec's default; many devices ship set to "N"
    stopbits: int = 1
    bytesize: int = 8
    interval: float = 1.0
    timeout: float = 0.2  # response timeout per request
    retries: int = 1
    backoff_max: float = 60.0
    max_gap: int = 8
    inter_frame: float = 0.0  # silence between frames; 0 = the spec's 3.5 characters (>= 1.75 ms)
    # How long a slave takes from the end of a request to the start of its answer. Used only by
    # the bus budget check (``bus_budget``); the protocol does not bound it, devices document it.
    turnaround: float = 0.005
    chain: tuple[str, ...] = ()


class SerialSource(_S, frozen=True, tag="serial", tag_field="type"):
    """A non-Modbus serial device (NMEA GPS, ASCII sensor, barcode reader ...)."""

    port: str
    baudrate: int = 9600
    parity: Parity = "N"
    stopbits: int = 1
    bytesize: int = 8
    device: str = ""  # default: the source's table name
    framing: Literal["delimiter", "fixed", "length_prefix", "idle"] = "delimiter"
    # delimiter framing: TOML escapes allowed ("\r\n"); the delimiter is not part of the frame
    delimiter: str = "\n"
    frame_length: int = 0  # fixed framing: bytes per frame
    length_offset: int = 0  # length_prefix: where the length field starts in the frame
    length_bytes: int = 1  # length_prefix: 1, 2 or 4
    length_order: Order = "big"  # length_prefix: byte order of the length field
    length_adjust: int = 0  # length_prefix: added to the length field to get the bytes after it
    idle: float = 0.02  # idle framing: a gap this long ends a frame
    max_frame: int = 4096  # longer frames are counted errors and dropped up to the next boundary
    chain: tuple[str, ...] = ()


class MqttSubscription(_S, frozen=True):
    topic: str  # MQTT filter, wildcards + and # allowed
    qos: int = 1  # 0, 1 or 2


class TlsConfig(_S, frozen=True):
    """TLS towards an MQTT broker. Paths are relative to the config file."""

    ca_file: str = ""  # CA bundle (PEM) that signed the broker's certificate; "" = system CAs
    cert_file: str = ""  # client certificate (PEM) for mutual TLS
    key_file: str = ""  # its private key (PEM); "" = inside cert_file
    verify_hostname: bool = True  # the broker's certificate must name the host we dial


class MqttSource(_S, frozen=True, tag="mqtt", tag_field="type"):
    """Subscriptions on a broker; each message's payload goes to the plugin chain."""

    topics: tuple[MqttSubscription, ...]
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # default: flux-edge-<daemon.name>-<source>
    username: str = ""
    password: str = ""
    keepalive: float = 30.0
    device: str = ""  # fixed device name; default: the source's table name
    device_from_topic: str = ""  # e.g. "site/{device}/telemetry": the {device} level names it
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    max_inflight: int = 100  # QoS 1/2 messages in flight (paho's default 20 costs throughput)
    buffer_size: int = 1000  # messages waiting for the pipeline before reading pauses
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None  # set (even empty: tls = {}) to connect with TLS
    chain: tuple[str, ...] = ()


SourceConfig = ModbusTcpSource | ModbusRtuSource | SerialSource | MqttSource


class RuleTestStep(_S, frozen=True, kw_only=True):
    """One measurement of a rule's built-in test case, at ``t`` seconds after the case starts."""

    t: float = 0.0
    device: str = ""  # default: the rule's device
    name: str
    value: bool | int | float | str
    quality: Literal["good", "stale", "bad"] = "good"


class RuleTest(_S, frozen=True, kw_only=True):
    """given measurements -> the actions the rule must ask for, in order (run by check-config and
    `flux-edge rules test`)."""

    name: str = ""
    given: tuple[RuleTestStep, ...]
    expect: tuple[str, ...] = ()  # action names, in firing order ("" list = must not fire)
    at: float = -1.0  # evaluate pending `for` timers up to this time (default: the last step)


class RuleConfig(_S, frozen=True):
    when: str  # CEL condition; variables: the device's measurements, previous/delta/age maps
    actions: tuple[str, ...]
    device: str = ""  # only this device's measurements trigger the rule; "" = any device
    mode: Literal["edge", "level"] = "edge"  # edge: fire once on becoming true
    inputs: dict[str, Literal["bool", "int", "double", "string"]] = {}  # extra variables' types
    description: str = ""
    for_: float = msgspec.field(default=0.0, name="for")  # must hold this long before firing
    off_when: str = ""  # hysteresis: once fired, the rule re-arms only when this is true
    off_actions: tuple[str, ...] = ()  # run when the rule re-arms (hysteresis) or goes false
    cooldown: float = 0.0  # after firing, not again for this long
    max_age: float = 0.0  # an input older than this counts as stale; 0 = no age limit
    allow_stale: bool = False  # stale/bad inputs may satisfy the condition (default: never)
    severity: Literal["debug", "info", "warning", "error"] = "info"  # log level when it fires
    tests: tuple[RuleTest, ...] = ()


class ModbusWriteAction(_S, frozen=True, tag="modbus_write", tag_field="type"):
    source: str  # the modbus source (TCP endpoint or RTU bus) to write through
    address: int
    value: bool | int
    function: Literal["coil", "holding"] = "coil"
    device: str = ""  # the device (unit id) on that source; required when it has several
    verify: bool = True  # read back and compare
    retries: int = 1  # further attempts after a failed or unverified write, within `timeout`
    timeout: float = 1.0


class SerialWriteAction(_S, frozen=True, tag="serial_write", tag_field="type"):
    source: str  # the serial source whose port is written
    data: str  # what to send
    encoding: Literal["text", "hex"] = "text"  # text: UTF-8 with TOML escapes; hex: "01 03 00"
    timeout: float = 1.0


class MqttPublishAction(_S, frozen=True, tag="mqtt_publish", tag_field="type"):
    """Publish a message rendered from the command over an MQTT source's broker connection."""

    source: str  # an MQTT source whose broker connection is used
    topic: str  # template: {device} {name} {value} {unit} {quality} {rule} {action} {ts}
    payload: str  # template; {value:json} etc. render JSON values
    qos: int = 1  # 0, 1 or 2
    retain: bool = False
    timeout: float = 5.0  # seconds: connection wait + publish + broker acknowledgement


class WasmAction(_S, frozen=True, tag="wasm", tag_field="type"):
    """Ask a plugin (its ``flux_act`` export) what to send, and send those bytes through another
    action's transport: a serial_write's port or an mqtt_publish's broker, topic, qos, retain."""

    plugin: str  # a declared [plugins.NAME] that exports flux_act
    target: str  # the serial_write or mqtt_publish action whose transport carries the bytes
    timeout: float = 1.0  # seconds for the send (the plugin call has the plugin's own timeout)


ActionConfig = ModbusWriteAction | SerialWriteAction | MqttPublishAction | WasmAction


class ProfileInfo(_S, frozen=True):
    """The ``[profile]`` table of a device profile file."""

    manufacturer: str
    model: str
    description: str = ""
    source: str = ""  # URL of the public register documentation the map was taken from


class DeviceProfile(_S, frozen=True):
    """A device profile file (config/devices/*.toml): a reusable register map."""

    profile: ProfileInfo
    registers: tuple[RegisterConfig, ...]


class ActuatorConfig(_S, frozen=True):
    """The safety layer in front of one physical actuator (a burner, a pump, a valve) driven by
    an "on" and an "off" action. Every command to those actions passes through it."""

    on: str  # action that switches it on
    off: str  # action that switches it off
    # the state applied on shutdown, on a watchdog stop and when inputs go stale
    safe: Literal["on", "off", "none"] = "off"
    min_on: float = 0.0  # once on, not switched off before this long (anti-chatter)
    min_off: float = 0.0  # once off, not switched on before this long
    max_switches: int = 0  # at most this many switches per `window`; 0 = unlimited
    window: float = 3600.0
    interlock: str = ""  # CEL: while true, switching ON is blocked (and it is driven to safe)
    interlock_device: str = ""  # the device whose values the interlock reads
    inputs: tuple[str, ...] = ()  # device.measurement names this actuator depends on; if any goes
    #                               stale/bad, the safe state is applied
    stale_after: float = 0.0  # an input older than this counts as stale; 0 = quality only


class MetricsConfig(_S, frozen=True):
    """Prometheus metrics (GET /metrics) and a health check (GET /healthz) over local HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"  # "0.0.0.0" exposes them to the network: mind the firewall
    port: int = 9180


class UplinkConfig(_S, frozen=True):
    """Every measurement forwarded to an upstream MQTT broker through a durable outbox."""

    host: str
    port: int = 1883
    client_id: str = ""  # default: flux-edge-<daemon.name>-uplink
    username: str = ""
    password: str = ""
    keepalive: float = 30.0
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None  # set (even empty: tls = {}) to connect with TLS
    qos: int = 1  # 1 or 2: the outbox deletes a record only when the broker acknowledged it
    # topic of each publish; {gateway}, {source}, {device} and {name} are filled in
    topic: str = "flux-edge/{gateway}/{device}/{name}"
    # "single": one JSON object per publish; "batch": a JSON array of up to batch_max records
    # that share a topic (use a topic without {name}, e.g. "flux-edge/{gateway}/{device}")
    format: Literal["single", "batch"] = "single"
    batch_max: int = 100
    # retained "online"; the broker publishes "offline" (last will) when the link dies
    status_topic: str = "flux-edge/{gateway}/status"
    max_inflight: int = 100  # publishes awaiting the broker's acknowledgement
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    outbox_file: str = ""  # default: <state_dir>/outbox.sqlite
    outbox_max_size: int = 64 * 1024 * 1024  # when full, the oldest records are dropped (counted)
    commit_interval: float = 0.02  # group commit: at most one SQLite commit per this interval
    sync_interval: float = 1.0  # fsync (WAL checkpoint) at most this often: power-loss window


class Config(_S, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    plugins: dict[str, PluginConfig] = {}
    sources: dict[str, SourceConfig] = {}
    rules: dict[str, RuleConfig] = {}
    actions: dict[str, ActionConfig] = {}
    actuators: dict[str, ActuatorConfig] = {}
    uplink: UplinkConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    # Set by the loader, not by the file:
    path: str = ""  # the file it was loaded from

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()


# =================================================================================================
# Loader. Everything below turns text into the Structs above, or into a list of Problems.
# =================================================================================================

_log = logging.getLogger(__name__)

Key = tuple[str | int, ...]  # a key path: ("sources", "boiler", "registers", 2, "type")

# --- durations and sizes ------------------------------------------------------------------------

DURATION_HELP = 'a duration: "50ms", "1s", "2m", "1h", "1h30m", "1d" or a number of seconds'
SIZE_HELP = 'a size: "512KiB", "16MiB", "1GB" or a number of bytes'

_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_RANK = {unit: rank for rank, unit in enumerate(_DURATION_UNITS)}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(rf"[+-]?{_NUMBER}")

_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE_RE = re.compile(rf"({_NUMBER}) ?([A-Za-z]+)")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: str | int | float) -> float:
    """A duration in seconds: ``"50ms"``, ``"1s"``, ``"2m"``, ``"1h"``, ``"1h30m"``, ``"1d"``,
    ``"0.5s"``, or a number of seconds (int or float).

    Units go from largest to smallest, each at most once. Zero is accepted (callers check their own
    lower bound); negative, infinite or NaN values are not. Raises ``ValueError`` saying what is
    wrong and what is expected.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {DURATION_HELP}, got {_got(value)}")
    if not isinstance(value, str):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    text = value
    if _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(
            f'{_got(text)} has no unit: write {text.lstrip("+")} (a number of seconds) or "{text}s"'
        )
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {_got(text)}")
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{_got(text)} is not {DURATION_HELP}")
    total = Decimal(0)
    last_rank = -1
    for match in _DURATION_PART.finditer(text):
        number, unit = match.group(1), match.group(2)
        rank = _DURATION_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f'{_got(text)}: units must go from largest to smallest, each once (like "1h30m")'
            )
        last_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
    seconds = float(total)
    if not math.isfinite(seconds):
        raise ValueError(f"{_got(text)} is too long a duration")
    return seconds


def parse_size(value: str | int | float) -> int:
    """A size in bytes: ``"512KiB"``, ``"16MiB"``, ``"1GB"``, ``"1.5 MiB"``, ``"100B"`` or a number
    of bytes. Units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024).
    The result must be a whole number of bytes, zero or more. Raises ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {SIZE_HELP}, got {_got(value)}")
    if not isinstance(value, str):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"a size must be a whole number of bytes, got {value}")
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return int(value)
    text = value
    if _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(f'{_got(text)} has no unit: write {text} (a number of bytes) or "{text}B"')
    if text.startswith("-"):
        raise ValueError(f"a size cannot be negative, got {_got(text)}")
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{_got(text)} is not {SIZE_HELP}")
    number, unit = match.group(1), match.group(2)
    if unit not in _SIZE_UNITS:
        folded = {u.lower(): u for u in _SIZE_UNITS}
        hint = folded.get(unit.lower()) or folded.get(unit.lower() + "b")
        units = ", ".join(_SIZE_UNITS)
        did = f'; did you mean "{number}{hint}"?' if hint else ""
        raise ValueError(f'{_got(text)}: unknown unit "{unit}" (units: {units}){did}')
    total = Decimal(number) * _SIZE_UNITS[unit]
    if total != total.to_integral_value():
        raise ValueError(f"{_got(text)} is not a whole number of bytes ({total})")
    return int(total)


# --- names --------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_NAME_HELP = "1-64 letters, digits, '_' or '-' (no dots, slashes or spaces)"
_CEL_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CEL_RESERVED = frozenset(
    {
        *("true", "false", "null", "in", "as", "break", "const", "continue", "else", "for"),
        *("function", "if", "import", "let", "loop", "package", "namespace", "return", "var"),
        *("void", "while"),
    }
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_name(value: str) -> str | None:
    if _NAME_RE.fullmatch(value):
        return None
    return f"{_got(value)} is not a valid name: use {_NAME_HELP}"


def _check_cel_ident(value: str) -> str | None:
    if not _CEL_IDENT.fullmatch(value):
        return (
            f"{_got(value)} is not usable as a rule variable: a name is a letter or '_' "
            "followed by letters, digits or '_' ([A-Za-z_][A-Za-z0-9_]*)"
        )
    if value in _CEL_RESERVED:
        return f"{_got(value)} is a reserved word in rule conditions: pick another name"
    return None


def _check_input_ref(value: str) -> str | None:
    device, dot, name = value.partition(".")
    if not dot or _check_name(device) or _check_cel_ident(name):
        return (
            f'{_got(value)} is not "device.measurement": a device name, a dot and a '
            'measurement name, like "boiler.temperature"'
        )
    return None


def _check_module(value: str) -> str | None:
    if "/" in value or "\\" in value:
        return f'{_got(value)}: "module" is a name looked up in plugin_dirs; use "file" for a path'
    if value.endswith(".wasm"):
        return f'{_got(value)}: give the module name without ".wasm" ("{value[:-5]}")'
    return None


def _check_host(value: str) -> str | None:
    if any(ch.isspace() for ch in value):
        return f"{_got(value)} is not a host name or IP address"
    return None


def _check_profile_ref(value: str) -> str | None:
    if value.endswith(".toml"):
        return None
    if _NAME_RE.fullmatch(value):
        return None
    return (
        f"{_got(value)}: a profile is a name looked up in daemon.profile_dirs "
        '(like "eastron_sdm630") or the path of a file ending in ".toml"'
    )


def _check_topic_filter(value: str) -> str | None:
    """An MQTT topic filter: '#' alone in the last level, '+' alone in its level, no NUL."""
    from flux_edge.mqtt import check_filter  # pure helpers; paho is not imported

    return check_filter(value)


_DEVICE_LEVEL = "{device}"


UPLINK_TOPIC_FIELDS = ("gateway", "source", "device", "name")


def _check_uplink_topic(value: str) -> str | None:
    """A publish topic with {gateway}/{source}/{device}/{name} placeholders."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        return f"bad placeholder in {_got(value)}: {exc}"
    for field in names:
        if field not in UPLINK_TOPIC_FIELDS:
            return (
                f"unknown placeholder {{{field}}} in {_got(value)}; placeholders: "
                + ", ".join("{" + f + "}" for f in UPLINK_TOPIC_FIELDS)
            )
    if "+" in value or "#" in value:
        return f"{_got(value)}: a publish topic cannot contain the wildcards + or #"
    return None


def _check_device_pattern(value: str) -> str | None:
    from flux_edge.mqtt import DevicePattern

    try:
        DevicePattern(value)
    except ValueError as exc:
        return str(exc)
    return None


# Baud rates serial adapters and Modbus devices offer; others are accepted with a warning.
_STANDARD_BAUDRATES = frozenset(
    {
        300,
        600,
        1200,
        2400,
        4800,
        9600,
        14400,
        19200,
        28800,
        38400,
        57600,
        76800,
        115200,
        128000,
        153600,
        230400,
        250000,
        256000,
        460800,
        500000,
        576000,
        921600,
        1000000,
        1152000,
        1500000,
        2000000,
        2500000,
        3000000,
        3500000,
        4000000,
    }
)


# --- per-field rules the types alone do not say ---------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Extra validation for one field (arrays: for each item; tables: ``keys`` for the names)."""

    kind: Literal["", "duration", "size"] = ""
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    positive: bool = False  # strictly greater than zero
    nonempty: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[str], str | None] | None = None  # for non-empty strings
    keys: Callable[[str], str | None] | None = None  # for the keys of a table
    help: str = ""  # what is expected, for messages about a missing key


_RULES: dict[tuple[type, str], _Rule] = {
    (DaemonConfig, "name"): _Rule(check=_check_name),
    (DaemonConfig, "state_dir"): _Rule(nonempty=True),
    (DaemonConfig, "plugin_dirs"): _Rule(nonempty=True),
    (DaemonConfig, "queue_size"): _Rule(min=1, max=10_000_000),
    (DaemonConfig, "batch_max"): _Rule(min=1, max=65_536),
    (DaemonConfig, "log_level"): _Rule(choices=_LOG_LEVELS),
    (PluginConfig, "module"): _Rule(check=_check_module),
    (PluginConfig, "timeout"): _Rule(kind="duration", positive=True, max=3600),
    (PluginConfig, "memory_limit"): _Rule(kind="size", min=64 * 1024, max=2**30),
    (PluginConfig, "max_failures"): _Rule(min=1, max=1_000_000),
    (PluginConfig, "quarantine"): _Rule(kind="duration", min=0),
    (DaemonConfig, "profile_dirs"): _Rule(nonempty=True),
    (RegisterConfig, "name"): _Rule(nonempty=True, check=_check_cel_ident),
    (RegisterConfig, "address"): _Rule(min=0, max=65535),
    (RegisterConfig, "count"): _Rule(min=1, max=125),
    (RegisterConfig, "interval"): _Rule(kind="duration", positive=True),
    (ModbusDeviceConfig, "name"): _Rule(nonempty=True, check=_check_name),
    (ModbusDeviceConfig, "unit_id"): _Rule(min=0, max=247),
    (ModbusDeviceConfig, "profile"): _Rule(check=_check_profile_ref),
    (ModbusDeviceConfig, "interval"): _Rule(kind="duration", min=0),
    (ModbusDeviceConfig, "timeout"): _Rule(kind="duration", min=0),
    (ModbusTcpSource, "host"): _Rule(nonempty=True, check=_check_host),
    (ModbusTcpSource, "port"): _Rule(min=1, max=65535),
    (ModbusTcpSource, "unit_id"): _Rule(min=0, max=247),
    (ModbusTcpSource, "interval"): _Rule(kind="duration", positive=True),
    (ModbusTcpSource, "timeout"): _Rule(kind="duration", positive=True),
    (ModbusTcpSource, "device"): _Rule(check=_check_name),
    (ModbusTcpSource, "max_gap"): _Rule(min=0, max=123),
    (ModbusTcpSource, "chain"): _Rule(nonempty=True),
    (ModbusTcpSource, "retries"): _Rule(min=0, max=100),
    (ModbusTcpSource, "backoff_max"): _Rule(kind="duration", positive=True),
    (ModbusRtuSource, "port"): _Rule(nonempty=True),
    (ModbusRtuSource, "baudrate"): _Rule(min=300, max=4_000_000),
    (ModbusRtuSource, "stopbits"): _Rule(min=1, max=2),
    (ModbusRtuSource, "bytesize"): _Rule(min=7, max=8),
    (ModbusRtuSource, "interval"): _Rule(kind="duration", positive=True),
    (ModbusRtuSource, "timeout"): _Rule(kind="duration", positive=True),
    (ModbusRtuSource, "retries"): _Rule(min=0, max=100),
    (ModbusRtuSource, "backoff_max"): _Rule(kind="duration", positive=True),
    (ModbusRtuSource, "max_gap"): _Rule(min=0, max=123),
    (ModbusRtuSource, "inter_frame"): _Rule(kind="duration", min=0, max=1),
    (ModbusRtuSource, "turnaround"): _Rule(kind="duration", min=0, max=10),
    (ModbusRtuSource, "chain"): _Rule(nonempty=True),
    (SerialSource, "port"): _Rule(nonempty=True),
    (SerialSource, "baudrate"): _Rule(min=300, max=4_000_000),
    (SerialSource, "stopbits"): _Rule(min=1, max=2),
    (SerialSource, "bytesize"): _Rule(min=7, max=8),
    (SerialSource, "device"): _Rule(check=_check_name),
    (SerialSource, "frame_length"): _Rule(min=0, max=16 * 2**20),
    (SerialSource, "length_offset"): _Rule(min=0, max=65535),
    (SerialSource, "length_adjust"): _Rule(min=-65535, max=65535),
    (SerialSource, "idle"): _Rule(kind="duration", positive=True, max=60),
    (SerialSource, "max_frame"): _Rule(kind="size", min=1, max=16 * 2**20),
    (SerialSource, "chain"): _Rule(nonempty=True),
    (MqttSubscription, "topic"): _Rule(nonempty=True, check=_check_topic_filter),
    (MqttSubscription, "qos"): _Rule(min=0, max=2),
    (MqttSource, "host"): _Rule(nonempty=True, check=_check_host),
    (MqttSource, "port"): _Rule(min=1, max=65535),
    (MqttSource, "keepalive"): _Rule(kind="duration", min=0, max=65535),
    (MqttSource, "device"): _Rule(check=_check_name),
    (MqttSource, "device_from_topic"): _Rule(check=_check_device_pattern),
    (MqttSource, "reconnect_min"): _Rule(kind="duration", positive=True),
    (MqttSource, "reconnect_max"): _Rule(kind="duration", positive=True),
    (MqttSource, "max_inflight"): _Rule(min=1, max=65535),
    (MqttSource, "buffer_size"): _Rule(min=1, max=1_000_000),
    (MqttSource, "chain"): _Rule(nonempty=True),
    (RuleConfig, "when"): _Rule(nonempty=True),
    (RuleConfig, "actions"): _Rule(nonempty=True),
    (RuleConfig, "inputs"): _Rule(keys=_check_cel_ident),
    (RuleConfig, "for"): _Rule(kind="duration", min=0),
    (RuleConfig, "cooldown"): _Rule(kind="duration", min=0),
    (RuleConfig, "max_age"): _Rule(kind="duration", min=0),
    (RuleConfig, "off_actions"): _Rule(nonempty=True),
    (RuleTestStep, "device"): _Rule(check=_check_name),
    (RuleTestStep, "name"): _Rule(nonempty=True),
    (RuleTestStep, "t"): _Rule(kind="duration", min=0),
    (RuleTest, "at"): _Rule(kind="duration", min=0),
    (ActuatorConfig, "on"): _Rule(nonempty=True),
    (ActuatorConfig, "off"): _Rule(nonempty=True),
    (ActuatorConfig, "min_on"): _Rule(kind="duration", min=0),
    (ActuatorConfig, "min_off"): _Rule(kind="duration", min=0),
    (ActuatorConfig, "max_switches"): _Rule(min=0, max=1_000_000),
    (ActuatorConfig, "window"): _Rule(kind="duration", positive=True),
    (ActuatorConfig, "interlock_device"): _Rule(check=_check_name),
    (ActuatorConfig, "inputs"): _Rule(nonempty=True, check=_check_input_ref),
    (ActuatorConfig, "stale_after"): _Rule(kind="duration", min=0),
    (DaemonConfig, "audit_max_size"): _Rule(kind="size", min=4096, max=2**40),
    (DaemonConfig, "audit_keep"): _Rule(min=0, max=1000),
    (ModbusWriteAction, "retries"): _Rule(min=0, max=10),
    (ModbusWriteAction, "source"): _Rule(nonempty=True),
    (ModbusWriteAction, "address"): _Rule(min=0, max=65535),
    (ModbusWriteAction, "timeout"): _Rule(kind="duration", positive=True),
    (ModbusWriteAction, "device"): _Rule(check=_check_name),
    (SerialWriteAction, "source"): _Rule(nonempty=True),
    (SerialWriteAction, "data"): _Rule(nonempty=True),
    (SerialWriteAction, "timeout"): _Rule(kind="duration", positive=True),
    (MqttPublishAction, "source"): _Rule(nonempty=True),
    (MqttPublishAction, "topic"): _Rule(nonempty=True),
    (MqttPublishAction, "qos"): _Rule(min=0, max=2),
    (MqttPublishAction, "timeout"): _Rule(kind="duration", positive=True),
    (WasmAction, "plugin"): _Rule(nonempty=True),
    (WasmAction, "target"): _Rule(nonempty=True),
    (WasmAction, "timeout"): _Rule(kind="duration", positive=True),
    (DaemonConfig, "stall_timeout"): _Rule(kind="duration", min=1, max=3600),
    (DaemonConfig, "shutdown_timeout"): _Rule(kind="duration", min=0.1, max=3600),
    (MetricsConfig, "host"): _Rule(nonempty=True, check=_check_host),
    (MetricsConfig, "port"): _Rule(min=0, max=65535),
    (UplinkConfig, "host"): _Rule(nonempty=True, check=_check_host),
    (UplinkConfig, "port"): _Rule(min=1, max=65535),
    (UplinkConfig, "keepalive"): _Rule(kind="duration", min=0, max=65535),
    (UplinkConfig, "qos"): _Rule(min=1, max=2),
    (UplinkConfig, "topic"): _Rule(nonempty=True, check=_check_uplink_topic),
    (UplinkConfig, "status_topic"): _Rule(check=_check_uplink_topic),
    (UplinkConfig, "batch_max"): _Rule(min=1, max=10_000),
    (UplinkConfig, "max_inflight"): _Rule(min=1, max=65535),
    (UplinkConfig, "reconnect_min"): _Rule(kind="duration", positive=True),
    (UplinkConfig, "reconnect_max"): _Rule(kind="duration", positive=True),
    (UplinkConfig, "outbox_max_size"): _Rule(kind="size", min=64 * 1024, max=2**40),
    (UplinkConfig, "commit_interval"): _Rule(kind="duration", min=0, max=10),
    (UplinkConfig, "sync_interval"): _Rule(kind="duration", min=0, max=3600),
    (Config, "plugins"): _Rule(keys=_check_name),
    (Config, "sources"): _Rule(keys=_check_name),
    (Config, "rules"): _Rule(keys=_check_name),
    (Config, "actions"): _Rule(keys=_check_name),
    (Config, "actuators"): _Rule(keys=_check_name),
}

# Fields the loader sets; a file may not.
_LOADER_ONLY: frozenset[tuple[type, str]] = frozenset({(Config, "path")})

# Registers (16-bit words) each register type takes; a "string" takes its ``count``. The one
# table of these widths: sources/modbus_plan.py reads it too.
REGISTER_WORDS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
_MODBUS_TYPES = ("modbus_tcp", "modbus_rtu")
_BIT_FUNCTIONS = frozenset({"coil", "discrete"})

# --- describing values --------------------------------------------------------------------------


def _got(value: object) -> str:
    """A short rendering of a TOML value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return msgspec.json.encode(shown).decode()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _desc(tp: Any, rule: _Rule | None = None) -> str:
    """What a value of type ``tp`` looks like, for messages."""
    if rule is not None and rule.kind == "duration":
        return DURATION_HELP
    if rule is not None and rule.kind == "size":
        return SIZE_HELP
    if rule is not None and rule.choices:
        return "one of " + ", ".join(rule.choices)
    origin = get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is tuple:
        return "an array of " + _plural(_desc(get_args(tp)[0]))
    if origin is dict:
        return "a table"
    if origin is Union or _is_union(tp):
        return " or ".join(_desc(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(tp, str(tp))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _plural(desc: str) -> str:
    for article in ("a ", "an "):
        if desc.startswith(article):
            return desc[len(article) :] + "s"
    return desc


def _is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType)


def _is_tagged(tp: Any) -> bool:
    return (
        isinstance(tp, type)
        and issubclass(tp, msgspec.Struct)
        and tp.__struct_config__.tag_field is not None
    )


def _fmt_path(path: Key) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else msgspec.json.encode(part).decode()
            out += ("." if out else "") + key
    return out


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"? ' if close else ""


# --- positions: where each key and value sits in the text ---------------------------------------


class _ScanError(Exception):
    """The scanner met text it does not understand (positions then fall back to enclosing ones)."""


class _Positions:
    """Offsets of keys and values in the source text, by key path.

    ``keys[path]`` is where the key (or table header name) defining ``path`` starts;
    ``values[path]`` the start and end of its value. Table headers, array-of-tables entries
    (``[[a.b]]`` counted per array), dotted keys, inline tables and arrays are all recorded.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.keys: dict[Key, int] = {}
        self.values: dict[Key, tuple[int, int]] = {}
        self.duplicate: int | None = None  # offset of the first key defined twice
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def linecol(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def _nearest(self, path: Key) -> int | None:
        for n in range(len(path), 0, -1):
            off = self.keys.get(path[:n])
            if off is not None:
                return off
        return None

    def key(self, path: Key) -> tuple[int, int]:
        """(line, column) of the key for ``path``, or of its nearest enclosing key; (0, 0)."""
        off = self._nearest(path)
        return self.linecol(off) if off is not None else (0, 0)

    def value(self, path: Key) -> tuple[int, int]:
        """(line, column) of the value for ``path``, else as ``key``."""
        span = self.values.get(path)
        if span is not None:
            return self.linecol(span[0])
        return self.key(path)

    def in_string(self, path: Key, index: int) -> tuple[int, int] | None:
        """(line, column) of the 0-based character ``index`` inside the string value at ``path``.

        Exact for strings without escapes; otherwise close to it.
        """
        span = self.values.get(path)
        if span is None:
            return None
        start, end = span
        raw = self.text[start:end]
        if raw[:3] in ('"""', "'''"):
            inner = start + 3
            if self.text.startswith("\r\n", inner):
                inner += 2
            elif self.text.startswith("\n", inner):
                inner += 1
        elif raw[:1] in ('"', "'"):
            inner = start + 1
        else:
            return None
        return self.linecol(max(start, min(inner + index, end - 1)))


_BARE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SIMPLE_ESCAPES = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    '"': '"',
    "\\": "\\",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _Scanner:
    """A position-recording walk over TOML text that tomlkit has already accepted (or that
    tomlkit rejected for a key defined twice, which this finds). Not a validator."""

    def __init__(self, text: str, positions: _Positions) -> None:
        self.t = text
        self.n = len(text)
        self.i = 0
        self.p = positions
        self.aot: dict[Key, int] = {}  # array-of-tables path -> entries so far
        self.assigned: set[Key] = set()  # paths given a value by `key = value`
        self.explicit: set[Key] = set()  # tables opened by a header (and [[ ]] entries)
        self.dotted: set[Key] = set()  # tables made by dotted keys

    # characters
    def ch(self, k: int = 0) -> str:
        j = self.i + k
        return self.t[j] if j < self.n else ""

    def fail(self) -> _ScanError:
        return _ScanError(self.i)

    def ws(self) -> None:
        while self.ch() in (" ", "\t") and self.ch():
            self.i += 1

    def comment(self) -> None:
        if self.ch() == "#":
            while self.ch() not in ("", "\n"):
                self.i += 1

    def ws_nl(self) -> None:
        while True:
            self.ws()
            self.comment()
            if self.ch() == "\n":
                self.i += 1
            elif self.ch() == "\r" and self.ch(1) == "\n":
                self.i += 2
            else:
                return

    def eol(self) -> None:
        self.ws()
        self.comment()
        if self.ch() == "":
            return
        if self.ch() == "\n":
            self.i += 1
        elif self.ch() == "\r" and self.ch(1) == "\n":
            self.i += 2
        else:
            raise self.fail()

    def dup(self, offset: int) -> None:
        if self.p.duplicate is None:
            self.p.duplicate = offset

    # document
    def run(self) -> None:
        table: Key = ()
        while True:
            self.ws_nl()
            if self.i >= self.n:
                return
            if self.ch() == "[":
                table = self.header()
            else:
                self.keyval(table)
            self.eol()

    def header(self) -> Key:
        is_aot = self.t.startswith("[[", self.i)
        self.i += 2 if is_aot else 1
        parts = self.key()
        closing = "]]" if is_aot else "]"
        if not self.t.startswith(closing, self.i):
            raise self.fail()
        self.i += len(closing)
        resolved: Key = ()
        for j, (name, off) in enumerate(parts):
            resolved = (*resolved, name)
            last = j == len(parts) - 1
            if resolved in self.assigned:
                self.dup(off)
            if last and is_aot:
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off)
                count = self.aot.get(resolved, 0)
                self.aot[resolved] = count + 1
                self.p.keys.setdefault(resolved, off)
                resolved = (*resolved, count)
                self.explicit.add(resolved)
                self.p.keys[resolved] = off
            elif last:
                if resolved in self.aot:
                    self.dup(off)
                if resolved in self.explicit or resolved in self.dotted:
                    self.dup(off)
                self.explicit.add(resolved)
                self.p.keys[resolved] = off
            else:
                self.p.keys.setdefault(resolved, off)
                if resolved in self.aot:
                    resolved = (*resolved, self.aot[resolved] - 1)
        return resolved

    def key(self) -> list[tuple[str, int]]:
        parts: list[tuple[str, int]] = []
        while True:
            self.ws()
            start = self.i
            c = self.ch()
            if c == '"':
                name = self.basic_string()
            elif c == "'":
                name = self.literal_string()
            else:
                while self.ch() in _BARE_CHARS and self.ch():
                    self.i += 1
                if self.i == start:
                    raise self.fail()
                name = self.t[start : self.i]
            parts.append((name, start))
            self.ws()
            if self.ch() != ".":
                return parts
            self.i += 1

    def keyval(self, table: Key) -> None:
        parts = self.key()
        if self.ch() != "=":
            raise self.fail()
        self.i += 1
        self.ws()
        path = table
        for j, (name, off) in enumerate(parts):
            path = (*path, name)
            if path in self.assigned:
                self.dup(off)
            if j < len(parts) - 1:
                self.dotted.add(path)
                self.p.keys.setdefault(path, off)
            else:
                if path in self.explicit or path in self.dotted:
                    self.dup(off)
                self.p.keys.setdefault(path, off)
        self.value(path)
        self.assigned.add(path)

    # values
    def value(self, path: Key) -> None:
        start = self.i
        c = self.ch()
        if self.t.startswith('"""', self.i):
            self.multiline('"""')
        elif self.t.startswith("'''", self.i):
            self.multiline("'''")
        elif c == '"':
            self.basic_string()
        elif c == "'":
            self.literal_string()
        elif c == "[":
            self.array(path)
        elif c == "{":
            self.inline_table(path)
        else:
            while self.ch() not in ("", ",", "]", "}", "#", "\n", "\r"):
                self.i += 1
            end = self.i
            while end > start and self.t[end - 1] in " \t":
                end -= 1
            if end == start:
                raise self.fail()
            self.p.values[path] = (start, end)
            self.p.keys.setdefault(path, start)
            return
        self.p.values[path] = (start, self.i)
        self.p.keys.setdefault(path, start)

    def array(self, path: Key) -> None:
        self.i += 1
        index = 0
        while True:
            self.ws_nl()
            if self.ch() == "]":
                self.i += 1
                return
            self.value((*path, index))
            index += 1
            self.ws_nl()
            if self.ch() == ",":
                self.i += 1
            elif self.ch() == "]":
                self.i += 1
                return
            else:
                raise self.fail()

    def inline_table(self, path: Key) -> None:
        self.i += 1
        while True:
            self.ws_nl()
            if self.ch() == "}":
                self.i += 1
                return
            self.keyval(path)
            self.ws_nl()
            if self.ch() == ",":
                self.i += 1
            elif self.ch() == "}":
                self.i += 1
                return
            else:
                raise self.fail()

    def basic_string(self) -> str:
        self.i += 1
        out: list[str] = []
        while True:
            c = self.ch()
            if c in ("", "\n"):
                raise self.fail()
            self.i += 1
            if c == '"':
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            e = self.ch()
            self.i += 1
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            elif e in _HEX_ESCAPES:
                digits = self.t[self.i : self.i + _HEX_ESCAPES[e]]
                self.i += _HEX_ESCAPES[e]
                try:
                    out.append(chr(int(digits, 16)))
                except (ValueError, OverflowError) as exc:
                    raise self.fail() from exc
            else:
                raise self.fail()

    def literal_string(self) -> str:
        self.i += 1
        start = self.i
        while self.ch() != "'":
            if self.ch() in ("", "\n"):
                raise self.fail()
            self.i += 1
        self.i += 1
        return self.t[start : self.i - 1]

    def multiline(self, delim: str) -> None:
        self.i += 3
        while True:
            if self.i >= self.n:
                raise self.fail()
            if self.t.startswith(delim, self.i):
                self.i += 3
                extra = 0
                while self.ch() == delim[0] and extra < 2:
                    self.i += 1
                    extra += 1
                return
            if delim == '"""' and self.ch() == "\\":
                self.i += 2
            else:
                self.i += 1


def _scan(text: str) -> _Positions:
    positions = _Positions(text)
    # On a failure what was recorded so far stays usable; the rest falls back to enclosing keys.
    with contextlib.suppress(_ScanError, RecursionError):
        _Scanner(text, positions).run()
    return positions


# --- schema validation --------------------------------------------------------------------------

_BAD: Any = object()  # "this value was rejected" (a Problem has been recorded)


class _Validator:
    """Walks the document against the Structs, collecting every problem.

    Returns plain data (lists, dicts, scalars, durations as float seconds, sizes as int bytes) in
    which rejected values are left out, so later passes can still look at the valid parts.
    """

    def __init__(self, file: str, positions: _Positions) -> None:
        self.file = file
        self.pos = positions
        self.problems: list[Problem] = []
        self.dirty: set[Key] = set()

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    def report(
        self,
        path: Key,
        message: str,
        *,
        at: Literal["key", "value"] = "value",
        where: Key | None = None,
        warning: bool = False,
    ) -> None:
        loc = path if where is None else where
        line, column = self.pos.key(loc) if at == "key" else self.pos.value(loc)
        severity = "warning" if warning else "error"
        self.problems.append(Problem(self.file, _fmt_path(path), message, line, column, severity))
        if not warning:
            self.dirty.add(path)

    def clean(self, path: Key) -> bool:
        n = len(path)
        return not any(d[:n] == path for d in self.dirty)

    # one value against one type
    def check(self, value: Any, tp: Any, path: Key, rule: _Rule | None = None) -> Any:
        if rule is not None and rule.kind:
            return self._measure(value, path, rule)
        origin = get_origin(tp)
        if tp is Any:
            self._jsonable(value, path)
            return value
        if origin is Literal:
            return self._literal(value, get_args(tp), path)
        if origin is tuple:
            return self._array(value, get_args(tp)[0], path, rule)
        if origin is dict:
            return self._table(value, get_args(tp)[1], path, rule)
        if origin is Union or _is_union(tp):
            if all(_is_tagged(a) for a in get_args(tp)):
                return self._tagged(value, get_args(tp), path)
            for alternative in get_args(tp):
                if self._is(value, alternative):
                    return self.check(value, alternative, path, rule)
            self.report(path, f"expected {_desc(tp)}, got {_got(value)}")
            return _BAD
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self._struct(value, tp, path)
        if not self._is(value, tp):
            self.report(path, f"expected {_desc(tp, rule)}, got {_got(value)}")
            return _BAD
        if tp is float:
            value = float(value)
            if not math.isfinite(value):
                self.report(path, f"expected a finite number, got {value}")
                return _BAD
        if rule is not None and not self._apply(value, path, rule):
            return _BAD
        return value

    @staticmethod
    def _is(value: Any, tp: Any) -> bool:
        if tp is bool:
            return isinstance(value, bool)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if tp is float:
            return _is_number(value)
        if tp is str:
            return isinstance(value, str)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):  # an optional table
            return isinstance(value, dict)
        return False

    def _apply(self, value: Any, path: Key, rule: _Rule) -> bool:
        """Range, choice and name rules on an already well-typed value."""
        message = None
        if isinstance(value, str):
            if rule.nonempty and not value:
                message = "must not be empty"
            elif rule.choices and value not in rule.choices:
                hint = _suggest(value, rule.choices).strip()
                message = f"expected one of {', '.join(rule.choices)}, got {_got(value)}"
                message += f"; {hint}" if hint else ""
            elif rule.check is not None and value:
                message = rule.check(value)
        elif _is_number(value):
            if rule.positive and value <= 0:
                message = f"must be greater than 0, got {_got(value)}"
            elif (
                rule.min is not None
                and rule.max is not None
                and not (rule.min <= value <= rule.max)
            ):
                message = (
                    f"must be between {_num(rule.min)} and {_num(rule.max)}, got {_got(value)}"
                )
            elif rule.min is not None and value < rule.min:
                message = f"must be at least {_num(rule.min)}, got {_got(value)}"
            elif rule.max is not None and value > rule.max:
                message = f"must be at most {_num(rule.max)}, got {_got(value)}"
        if message:
            self.report(path, message)
            return False
        return True

    def _measure(self, value: Any, path: Key, rule: _Rule) -> Any:
        """A duration (-> float seconds) or a size (-> int bytes)."""
        try:
            result: float | int = (
                parse_duration(value) if rule.kind == "duration" else parse_size(value)
            )
        except ValueError as exc:
            self.report(path, str(exc))
            return _BAD
        except (InvalidOperation, OverflowError):
            self.report(path, f"expected {_desc(None, rule)}, got {_got(value)}")
            return _BAD
        unit = "s" if rule.kind == "duration" else " bytes"
        if rule.positive and result <= 0:
            self.report(path, f"must be greater than 0, got {_got(value)}")
            return _BAD
        if rule.min is not None and result < rule.min:
            self.report(path, f"must be at least {_num(rule.min)}{unit}, got {_got(value)}")
            return _BAD
        if rule.max is not None and result > rule.max:
            self.report(path, f"must be at most {_num(rule.max)}{unit}, got {_got(value)}")
            return _BAD
        return result

    def _tagged(self, value: Any, alternatives: tuple[Any, ...], path: Key) -> Any:
        """A table of one of several tagged Structs, chosen by its tag field ("type")."""
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        tag_field = alternatives[0].__struct_config__.tag_field
        by_tag = {str(a.__struct_config__.tag): a for a in alternatives}
        names = ", ".join(by_tag)
        if tag_field not in value:
            self.report(
                (*path, tag_field),
                f'missing required key "{tag_field}" (expected one of {names})',
                at="key",
                where=path,
            )
            return _BAD
        tag = value[tag_field]
        cls = by_tag.get(tag) if isinstance(tag, str) else None
        if cls is None:
            hint = _suggest(tag, list(by_tag)) if isinstance(tag, str) else ""
            self.report(
                (*path, tag_field), f"expected one of {names}, got {_got(tag)}; {hint}".rstrip("; ")
            )
            return _BAD
        return self._struct(value, cls, path)

    def _literal(self, value: Any, choices: tuple[Any, ...], path: Key) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        names = [str(c) for c in choices]
        hint = _suggest(value, names).strip() if isinstance(value, str) else ""
        got = f"expected one of {', '.join(names)}, got {_got(value)}"
        self.report(path, got + (f"; {hint}" if hint else ""))
        return _BAD

    def _array(self, value: Any, item: Any, path: Key, rule: _Rule | None) -> Any:
        if not isinstance(value, list):
            self.report(
                path, f"expected an array of {_plural(_desc(item, rule))}, got {_got(value)}"
            )
            return _BAD
        out = []
        for index, element in enumerate(value):
            checked = self.check(element, item, (*path, index), rule)
            if checked is not _BAD:
                out.append(checked)
        return out

    def _table(self, value: Any, item: Any, path: Key, rule: _Rule | None) -> Any:
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        out = {}
        for key, element in value.items():
            if rule is not None and rule.keys is not None:
                message = rule.keys(key)
                if message:
                    self.report((*path, key), message, at="key")
                    continue
            checked = self.check(element, item, (*path, key))
            if checked is not _BAD:
                out[key] = checked
        return out

    def _jsonable(self, value: Any, path: Key) -> None:
        """Plugin config goes to the guest as JSON: no dates, no inf/nan."""
        if isinstance(value, datetime | date | time):
            self.report(
                path,
                f"{_got(value)} cannot be passed to a plugin (its config is JSON): "
                "quote it as a string",
            )
        elif isinstance(value, float) and not math.isfinite(value):
            self.report(path, f"{value} cannot be passed to a plugin (its config is JSON)")
        elif isinstance(value, list):
            for index, element in enumerate(value):
                self._jsonable(element, (*path, index))
        elif isinstance(value, dict):
            for key, element in value.items():
                self._jsonable(element, (*path, key))

    def _struct(self, value: Any, cls: type[msgspec.Struct], path: Key) -> Any:
        if not isinstance(value, dict):
            self.report(path, f"expected a table, got {_got(value)}")
            return _BAD
        # keyed by the TOML key: msgspec's encoded name (RuleConfig.for_ is "for")
        fields = {
            f.encode_name: f
            for f in msgspec.structs.fields(cls)
            if (cls, f.name) not in _LOADER_ONLY
        }
        conf = cls.__struct_config__
        tag_field, tag = conf.tag_field, conf.tag
        allowed = list(fields) + ([tag_field] if tag_field else [])
        out: dict[str, Any] = {}
        before = self.errors
        for key, element in value.items():
            kpath = (*path, key)
            if tag_field is not None and key == tag_field:
                if element != tag:
                    hint = _suggest(element, [str(tag)]) if isinstance(element, str) else ""
                    self.report(
                        kpath, f"expected one of {tag}, got {_got(element)}; {hint}".rstrip("; ")
                    )
                continue
            field = fields.get(key)
            if field is None:
                self.report(
                    kpath,
                    f'unknown key "{key}"; {_suggest(key, allowed)}'
                    f"allowed here: {', '.join(allowed)}",
                    at="key",
                )
                continue
            checked = self.check(element, field.type, kpath, _RULES.get((cls, key)))
            if checked is not _BAD:
                out[key] = checked
        if tag_field is not None:
            if tag_field not in value:
                self.report(
                    (*path, tag_field),
                    f'missing required key "{tag_field}" (expected one of {tag})',
                    at="key",
                    where=path,
                )
            out[tag_field] = tag
        for field in fields.values():
            if field.required and field.encode_name not in value:
                rule = _RULES.get((cls, field.encode_name))
                self.report(
                    (*path, field.encode_name),
                    f'missing required key "{field.encode_name}" ({_desc(field.type, rule)})',
                    at="key",
                    where=path,
                )
        check = _STRUCT_CHECKS.get(cls)
        if check is not None:
            check(self, out, path, self.errors == before)
        return out


# --- checks that span several fields of one table ------------------------------------------------


def _register_words(register: dict[str, Any]) -> int:
    """Registers (or bits) one checked register entry takes."""
    if register.get("function", "holding") in _BIT_FUNCTIONS:
        return 1
    type_ = register.get("type", "uint16")
    if type_ == "string":
        return max(1, int(register.get("count", 1)))
    return REGISTER_WORDS.get(type_, 1)


def _register_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    function = out.get("function", "holding")
    if function in _BIT_FUNCTIONS:
        if "type" not in out:
            out["type"] = "bool"  # a coil or discrete input is one bit: bool unless told
        elif out["type"] != "bool":
            v.report(
                (*path, "type"),
                f'a {function} is a single bit: type must be "bool", got {_got(out["type"])}',
            )
            return
    type_ = out.get("type", "uint16")
    if type_ == "string" and "count" not in out:
        v.report(
            (*path, "count"),
            'a string needs "count": how many registers it takes (2 characters each)',
            at="key",
            where=path,
        )
        return
    if type_ != "string" and "count" in out:
        v.report(
            (*path, "count"),
            f'"count" is only for type = "string"; a {type_} has a fixed size',
            at="key",
        )
        return
    words = _register_words(out)
    if out["address"] + words - 1 > 65535:
        v.report(
            (*path, "address"),
            f"a {type_} takes {words} registers: address must be at most {65536 - words}",
        )


def _unique_register_names(v: _Validator, registers: list[Any], path: Key, scope: str) -> None:
    seen: dict[str, int] = {}
    for index, register in enumerate(registers):
        name = register.get("name") if isinstance(register, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            v.report(
                (*path, "registers", index, "name"),
                f'register name "{name}" is already used by registers[{seen[name]}]: '
                f"names must be unique within {scope}",
            )
        else:
            seen[name] = index


def _unique_unit_ids(v: _Validator, devices: list[Any], path: Key) -> None:
    seen: dict[int, int] = {}
    for index, device in enumerate(devices):
        if not v.clean((*path, "devices", index, "unit_id")):
            continue  # a bad unit id is not the default
        unit = device.get("unit_id", 1)
        if unit in seen:
            other = devices[seen[unit]].get("name", "?")
            given = "unit_id" in device
            default = "" if given else " (the default)"
            v.report(
                (*path, "devices", index, "unit_id"),
                f'unit id {unit}{default} is already used by devices[{seen[unit]}] ("{other}"): '
                "each device on a bus answers to its own address",
                at="value" if given else "key",
                where=None if given else (*path, "devices", index),
            )
        else:
            seen[unit] = index


def _device_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _unique_register_names(v, out.get("registers", []), path, "a device")


_SHORTHAND_KEYS = ("device", "unit_id", "registers")


def _tcp_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _unique_register_names(v, out.get("registers", []), path, "a source")
    if "devices" not in out:
        if clean and not out.get("registers"):
            v.report(
                path, "this source has no registers: it will poll nothing", at="key", warning=True
            )
        return
    for key in _SHORTHAND_KEYS:
        if key in out:
            v.report(
                (*path, key),
                'give either the single-device keys (device, unit_id, registers) or "devices", '
                f'not both: move "{key}" into a device',
                at="key",
            )
    if clean and not out["devices"]:
        v.report(
            (*path, "devices"),
            '"devices" is empty: list at least one device, or leave it out and give '
            "unit_id and registers",
        )
    _unique_unit_ids(v, out["devices"], path)


def _baudrate_warning(v: _Validator, out: dict[str, Any], path: Key) -> None:
    baud = out.get("baudrate")
    if baud is not None and baud not in _STANDARD_BAUDRATES:
        v.report(
            (*path, "baudrate"),
            f"{baud} is not a standard baud rate (9600, 19200, 38400, 115200, ...): check the "
            "device's setting; a rate the serial adapter cannot generate fails when the port opens",
            warning=True,
        )


def _rtu_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _baudrate_warning(v, out, path)
    devices = out.get("devices")
    if devices is None:
        return  # missing: already reported
    if clean and not devices:
        v.report(
            (*path, "devices"),
            "an RTU bus needs at least one device: "
            'devices = [{ name = "meter1", unit_id = 1, profile = "eastron_sdm120" }]',
        )
    for index, device in enumerate(devices):
        if device.get("unit_id", 1) == 0:
            v.report(
                (*path, "devices", index, "unit_id"),
                "unit id 0 is the broadcast address on a serial bus: no device answers a read "
                "sent to it; give the device's own address, 1..247",
            )
    _unique_unit_ids(v, devices, path)


# Keys each serial framing reads; the others are ignored (a warning if given).
_FRAMING_KEYS: dict[str, frozenset[str]] = {
    "delimiter": frozenset({"delimiter"}),
    "fixed": frozenset({"frame_length"}),
    "length_prefix": frozenset({"length_offset", "length_bytes", "length_order", "length_adjust"}),
    "idle": frozenset({"idle"}),
}
_ALL_FRAMING_KEYS = sorted(frozenset().union(*_FRAMING_KEYS.values()))


def _serial_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    _baudrate_warning(v, out, path)
    if not clean:
        return
    framing = out.get("framing", "delimiter")
    max_frame = out.get("max_frame", 4096)
    if framing == "delimiter" and out.get("delimiter", "\n") == "":
        v.report(
            (*path, "delimiter"), 'delimiter framing needs a delimiter, like "\\n" or "\\r\\n"'
        )
    elif framing == "delimiter" and any(ord(c) > 0xFF for c in out.get("delimiter", "\n")):
        v.report(
            (*path, "delimiter"),
            "a delimiter is bytes: use characters U+0000..U+00FF, written as TOML escapes "
            'like "\\u0003" for byte 0x03',
        )
    elif framing == "fixed":
        length = out.get("frame_length", 0)
        if length < 1:
            v.report(
                (*path, "frame_length"),
                'fixed framing needs "frame_length": the number of bytes in each frame (1 or more)',
                at="value" if "frame_length" in out else "key",
                where=None if "frame_length" in out else path,
            )
        elif length > max_frame:
            v.report(
                (*path, "frame_length"),
                f"frame_length {length} is more than max_frame ({max_frame}): every frame would "
                "be dropped; raise max_frame",
            )
    elif framing == "length_prefix":
        width = out.get("length_bytes", 1)
        if width not in (1, 2, 4):
            v.report(
                (*path, "length_bytes"), f"the length field is 1, 2 or 4 bytes long, got {width}"
            )
        elif out.get("length_offset", 0) + width > max_frame:
            v.report(
                (*path, "length_offset"),
                f"the length field ends past max_frame ({max_frame} bytes): no frame fits",
            )
    for key in _ALL_FRAMING_KEYS:
        if key in out and key not in _FRAMING_KEYS[framing]:
            v.report(
                (*path, key),
                f'"{key}" is not used with framing = "{framing}"',
                at="key",
                warning=True,
            )


def _filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters."""
    left, right = a.split("/"), b.split("/")
    for index in range(max(len(left), len(right))):
        x = left[index] if index < len(left) else None
        y = right[index] if index < len(right) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


def _mqtt_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    topics = out.get("topics")
    if clean and topics is not None and not topics:
        v.report(
            (*path, "topics"),
            'subscribe to at least one topic: topics = [{ topic = "site/+/telemetry" }]',
        )
    seen: dict[str, int] = {}
    for index, subscription in enumerate(topics or []):
        topic = subscription.get("topic")
        if not isinstance(topic, str):
            continue
        if topic in seen:
            v.report(
                (*path, "topics", index, "topic"),
                f'topic "{topic}" is already subscribed by topics[{seen[topic]}]',
            )
        else:
            seen[topic] = index
    pattern = out.get("device_from_topic", "")
    if out.get("device") and pattern:
        v.report(
            (*path, "device_from_topic"),
            'give either "device" (one fixed name) or "device_from_topic" (a name taken from '
            "each message's topic), not both",
        )
    elif clean and pattern and seen:
        wildcard = pattern.replace(_DEVICE_LEVEL, "+")
        if not any(_filters_overlap(wildcard, topic) for topic in seen):
            v.report(
                (*path, "device_from_topic"),
                f"no subscribed topic can match {_got(pattern)}, so no message would get its "
                f"device name from it; subscribed: {', '.join(seen)}",
                warning=True,
            )
    low, high = out.get("reconnect_min", 1.0), out.get("reconnect_max", 60.0)
    if clean and high < low:
        v.report(
            (*path, "reconnect_max"),
            f"must be at least reconnect_min ({low:g}s), got {high:g}s",
        )


def _serial_write_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean or out.get("encoding", "text") != "hex":
        return
    try:
        bytes.fromhex(out["data"])
    except ValueError:
        v.report(
            (*path, "data"),
            f"{_got(out['data'])} is not hex bytes: write pairs of hex digits, optionally "
            'separated by spaces, like "01 03 00 00 00 0a"',
        )


def _mqtt_publish_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    from flux_edge.actions.templates import TemplateError, compile_template
    from flux_edge.mqtt import check_topic

    for field in ("topic", "payload"):
        text = out.get(field)
        if not isinstance(text, str) or not v.clean((*path, field)):
            continue
        try:
            template = compile_template(text)
        except TemplateError as exc:
            where = (*path, field)
            line, col = v.pos.value(where)
            if exc.column > 0:
                line, col = v.pos.in_string(where, exc.column - 1) or (line, col)
            v.problems.append(Problem(v.file, _fmt_path(where), exc.message, line, col))
            v.dirty.add(where)
            continue
        if field == "topic":  # the literal parts, each placeholder standing for one character
            problem = check_topic(template.render(dict.fromkeys(template.names, "x")))
            if problem:
                v.report((*path, field), problem)


def _plugin_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if out.get("file") and out.get("module"):
        v.report(
            (*path, "file"),
            'give either "file" (a path) or "module" (a name looked up in plugin_dirs), not both',
        )


def _action_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if not clean:
        return
    value = out["value"]
    if out.get("function", "coil") == "coil":
        if not isinstance(value, bool):
            v.report((*path, "value"), f"a coil takes true or false, got {_got(value)}")
    elif isinstance(value, bool) or not -32768 <= value <= 65535:
        v.report(
            (*path, "value"),
            "a holding register takes an integer from -32768 to 65535 (negative values are "
            f"written as 16-bit two's complement), got {_got(value)}",
        )


def _rule_checks(v: _Validator, out: dict[str, Any], path: Key, clean: bool) -> None:
    if clean and not out.get("actions"):
        v.report(
            (*path, "actions"), "this rule has no actions: it will never do anything", warning=True
        )


_STRUCT_CHECKS: dict[type, Callable[[_Validator, dict[str, Any], Key, bool], None]] = {
    RegisterConfig: _register_checks,
    ModbusDeviceConfig: _device_checks,
    ModbusTcpSource: _tcp_checks,
    ModbusRtuSource: _rtu_checks,
    SerialSource: _serial_checks,
    MqttSource: _mqtt_checks,
    PluginConfig: _plugin_checks,
    ModbusWriteAction: _action_checks,
    SerialWriteAction: _serial_write_checks,
    MqttPublishAction: _mqtt_publish_checks,
    RuleConfig: _rule_checks,
}


# --- plugin files -------------------------------------------------------------------------------


def bundled_plugin_dir() -> Path:
    """Where the plugins shipped with flux-edge live (built by plugins/build-all.sh)."""
    return Path(__file__).resolve().parent / "plugins" / "bundled"


def _candidates(
    base_dir: Path, plugin_dirs: tuple[str, ...] | list[str], name: str, module: str, file: str
) -> list[Path]:
    if file:
        given = Path(file).expanduser()
        return [given if given.is_absolute() else base_dir / given]
    filename = f"{module or name}.wasm"
    dirs = [Path(d).expanduser() for d in plugin_dirs]
    dirs = [d if d.is_absolute() else base_dir / d for d in dirs]
    return [d / filename for d in [*dirs, bundled_plugin_dir()]]


def _missing_wasm(name: str, file: str, candidates: list[Path]) -> str:
    build = (
        "build the bundled plugins with plugins/build-all.sh, "
        "or your own with `flux-edge plugin build DIR`"
    )
    if file:
        return f'plugin "{name}": file {candidates[0]} does not exist; {build}'
    return (
        f'plugin "{name}": {candidates[0].name} not found; looked in: '
        + ", ".join(str(c.parent) for c in candidates)
        + f"; {build}"
    )


def plugin_search_paths(config: Config, name: str) -> list[Path]:
    """The files tried for plugin ``name``, in order: ``file`` (relative to the config file's
    directory), else ``<module or name>.wasm`` in each of ``daemon.plugin_dirs`` (relative to the
    config file's directory), then in ``bundled_plugin_dir()``. ``KeyError`` if undeclared."""
    plugin = config.plugins[name]
    return _candidates(config.base_dir, config.daemon.plugin_dirs, name, plugin.module, plugin.file)


def resolve_plugin_path(config: Config, name: str) -> Path:
    """The .wasm file for plugin ``name``. Raises ``ConfigError`` naming every place searched."""
    if name not in config.plugins:
        declared = ", ".join(config.plugins) or "none"
        raise ConfigError(
            [
                Problem(
                    config.path,
                    f"plugins.{name}",
                    f'no plugin "{name}" is declared (declared: {declared})',
                )
            ]
        )
    candidates = plugin_search_paths(config, name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    message = _missing_wasm(name, config.plugins[name].file, candidates)
    raise ConfigError([Problem(config.path, _fmt_path(("plugins", name)), message)])


# --- references between tables ------------------------------------------------------------------


def _names(raw: dict[str, Any], section: str) -> list[str] | None:
    """The names declared in a top-level table, or None if it is not a table (already reported)."""
    table = raw.get(section, {})
    return list(table) if isinstance(table, dict) else None


def _missing_ref(kind: str, name: str, declared: list[str]) -> str:
    listed = ", ".join(declared) if declared else "none"
    return f'no {kind} named "{name}"; {_suggest(name, declared)}declared {kind}s: {listed}'


def _cross_check(v: _Validator, raw: dict[str, Any], data: dict[str, Any], base_dir: Path) -> None:
    plugins = _names(raw, "plugins")
    sources = _names(raw, "sources")
    actions = _names(raw, "actions")
    src_data: dict[str, Any] = data.get("sources", {})
    used_plugins: set[str] = set()
    act_data: dict[str, Any] = data.get("actions", {})
    for aname, action in act_data.items():
        if action.get("type") != "wasm" or not isinstance(action.get("plugin"), str):
            continue
        pname = action["plugin"]
        used_plugins.add(pname)
        if plugins is not None and pname and pname not in plugins:
            v.report(("actions", aname, "plugin"), _missing_ref("plugin", pname, plugins))

    for sname, src in src_data.items():
        for index, pname in enumerate(src.get("chain", [])):
            used_plugins.add(pname)
            if plugins is not None and pname not in plugins:
                v.report(("sources", sname, "chain", index), _missing_ref("plugin", pname, plugins))

    daemon = data.get("daemon", {})
    plugin_dirs = daemon.get("plugin_dirs", DaemonConfig().plugin_dirs)
    if not v.clean(("daemon", "plugin_dirs")):
        plugin_dirs = ()
    for pname, plugin in data.get("plugins", {}).items():
        path: Key = ("plugins", pname)
        if not (v.clean((*path, "file")) and v.clean((*path, "module"))):
            continue
        file, module = plugin.get("file", ""), plugin.get("module", "")
        candidates = _candidates(base_dir, plugin_dirs, pname, module, file)
        if not any(c.is_file() for c in candidates):
            where = (*path, "file") if file else (*path, "module") if module else path
            v.report(
                where,
                _missing_wasm(pname, file, candidates),
                at="value" if (file or module) else "key",
            )
        if sources is not None and pname not in used_plugins:
            v.report(
                path,
                f'plugin "{pname}" is declared but no source\'s chain uses it',
                at="key",
                warning=True,
            )

    _check_mqtt_clients(v, src_data, base_dir)
    _check_uplink(v, data, base_dir)
    _check_action_targets(v, data, sources)
    declared, dynamic = _declared_devices(data)
    _check_device_names(v, declared)
    _check_ports(v, src_data)

    devices = {name for name, _ in declared}
    known_devices = sources is not None and not dynamic and v.clean(("sources",))
    for rname, rule in data.get("rules", {}).items():
        for key in ("actions", "off_actions"):
            for index, aname in enumerate(rule.get(key, [])):
                if actions is not None and aname not in actions:
                    v.report(("rules", rname, key, index), _missing_ref("action", aname, actions))
        _check_rule_tests(v, rname, rule, devices if known_devices else None)
        device = rule.get("device")
        if (
            device
            and sources is not None
            and not dynamic
            and v.clean(("sources",))
            and device not in devices
        ):
            v.report(
                ("rules", rname, "device"),
                f'no source reads a device named "{device}", so this rule never fires; '
                f"{_suggest(device, sorted(devices))}"
                f"devices: {', '.join(sorted(devices)) or 'none'}",
                warning=True,
            )


def _check_rule_tests(
    v: _Validator, rname: str, rule: dict[str, Any], devices: set[str] | None
) -> None:
    """A rule's own test cases: steps name a device it can see, expectations name its actions."""
    own = [*rule.get("actions", []), *rule.get("off_actions", [])]
    for tindex, case in enumerate(rule.get("tests", [])):
        path: Key = ("rules", rname, "tests", tindex)
        for sindex, step in enumerate(case.get("given", [])):
            device = step.get("device") or rule.get("device", "")
            spath: Key = (*path, "given", sindex)
            if not device:
                v.report(
                    (*spath, "device"),
                    "the rule watches every device: say which one sent this measurement "
                    '(device = "...")',
                    at="key",
                    where=spath,
                )
            elif step.get("device") and rule.get("device") and device != rule["device"]:
                v.report(
                    (*spath, "device"),
                    f'the rule watches device "{rule["device"]}" only: a measurement of '
                    f'"{device}" never reaches it',
                )
            elif devices is not None and device not in devices and step.get("device"):
                v.report(
                    (*spath, "device"),
                    f'no source reads a device named "{device}"; '
                    f"{_suggest(device, sorted(devices))}"
                    f"devices: {', '.join(sorted(devices)) or 'none'}",
                )
        for eindex, aname in enumerate(case.get("expect", [])):
            if aname not in own:
                v.report(
                    (*path, "expect", eindex),
                    f'"{aname}" is not one of this rule\'s actions or off_actions; '
                    f"{_suggest(aname, own)}its actions: {', '.join(own) or 'none'}",
                )


def _check_actuators(v: _Validator, data: dict[str, Any], actions: list[str] | None) -> None:
    """Actuators name existing actions, each action belongs to at most one actuator; inputs and
    interlock_device name known devices (register names checked for Modbus devices)."""
    owner: dict[str, str] = {}
    declared, dynamic = _declared_devices(data)
    devices = {name for name, _ in declared}
    check_devices = not dynamic and v.clean(("sources",)) and isinstance(data.get("sources"), dict)
    registers: dict[str, set[str]] = {}
    for src in data.get("sources", {}).values():
        if src.get("type") in _MODBUS_TYPES:
            for device in src.get("devices", []):
                if isinstance(device.get("name"), str):
                    registers[device["name"]] = {
                        str(r.get("name"))
                        for r in device.get("registers", [])
                        if isinstance(r, dict)
                    }
    for aname, actuator in data.get("actuators", {}).items():
        path: Key = ("actuators", aname)
        for key in ("on", "off"):
            target = actuator.get(key)
            if not isinstance(target, str) or not target:
                continue
            if actions is not None and target not in actions:
                v.report((*path, key), _missing_ref("action", target, actions))
            elif target in owner and owner[target] != aname:
                v.report(
                    (*path, key),
                    f'action "{target}" already belongs to actuator "{owner[target]}": an '
                    "action drives one actuator, so that one safety layer sees every command",
                )
            else:
                owner[target] = aname
        if actuator.get("on") and actuator.get("on") == actuator.get("off"):
            v.report((*path, "off"), '"on" and "off" must be two different actions')
        if not check_devices:
            continue
        device = actuator.get("interlock_device", "")
        if device and device not in devices:
            v.report(
                (*path, "interlock_device"),
                f'no source reads a device named "{device}"; {_suggest(device, sorted(devices))}'
                f"devices: {', '.join(sorted(devices)) or 'none'}",
            )
        if device and not actuator.get("interlock"):
            v.report(
                (*path, "interlock_device"),
                '"interlock_device" is set but there is no "interlock" condition',
                at="key",
                warning=True,
            )
        for index, ref in enumerate(actuator.get("inputs", [])):
            dname, _, mname = ref.partition(".")
            if dname not in devices:
                v.report(
                    (*path, "inputs", index),
                    f'no source reads a device named "{dname}"; '
                    f"{_suggest(dname, sorted(devices))}"
                    f"devices: {', '.join(sorted(devices)) or 'none'}",
                )
            elif dname in registers and mname not in registers[dname]:
                names = sorted(n for n in registers[dname] if isinstance(n, str))
                v.report(
                    (*path, "inputs", index),
                    f'device "{dname}" has no register named "{mname}" (a plugin may still '
                    f"produce it); {_suggest(mname, names)}registers: {', '.join(names) or 'none'}",
                    warning=True,
                )


def _declared_devices(data: dict[str, Any]) -> tuple[list[tuple[str, Key]], bool]:
    """Every device name the checked sources declare, with the key path that names it; and
    whether some source names its devices at run time (MQTT ``device_from_topic``)."""
    declared: list[tuple[str, Key]] = []
    dynamic = False
    for sname, src in data.get("sources", {}).items():
        kind = src.get("type")
        if kind in _MODBUS_TYPES and (kind == "modbus_rtu" or "devices" in src):
            for index, device in enumerate(src.get("devices", [])):
                name = device.get("name")
                if isinstance(name, str):
                    declared.append((name, ("sources", sname, "devices", index, "name")))
        elif kind == "mqtt" and src.get("device_from_topic"):
            dynamic = True
        elif src.get("device"):
            declared.append((src["device"], ("sources", sname, "device")))
        else:
            declared.append((sname, ("sources", sname)))
    return declared, dynamic


def _check_device_names(v: _Validator, declared: list[tuple[str, Key]]) -> None:
    first: dict[str, Key] = {}
    for name, path in declared:
        if name not in first:
            first[name] = path
            continue
        other = first[name]
        if len(other) == 2:
            by = f'source "{other[1]}" (a source without "device" is named after its table)'
        else:
            by = _fmt_path(other)
        v.report(
            path,
            f'device name "{name}" is already used by {by}: measurements are keyed by '
            "device, so device names must be unique across all sources",
            at="key" if len(path) == 2 else "value",
        )


def _port_identity(port: str) -> str:
    """Ports compared by the device they open (/dev/serial/by-id/... links resolved)."""
    with contextlib.suppress(OSError, RuntimeError):
        if Path(port).exists():
            return str(Path(port).resolve())
    return port


def _resolve_tls_files(v: _Validator, tls: object, where: Key, base_dir: Path) -> None:
    """TLS files (MQTT sources, uplink) must exist; relative paths become absolute, next to the
    config file."""
    if not isinstance(tls, dict):
        return
    for key in ("ca_file", "cert_file", "key_file"):
        value = tls.get(key, "")
        if not isinstance(value, str) or not value:
            continue
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            v.report((*where, key), f"no such file: {path}")
        else:
            tls[key] = str(path)


def _check_mqtt_clients(v: _Validator, src_data: dict[str, Any], base_dir: Path) -> None:
    """Two sources with one client id would keep kicking each other off the broker; TLS files
    must exist."""
    ids: dict[str, str] = {}
    for sname, src in src_data.items():
        if src.get("type") != "mqtt":
            continue
        cid = src.get("client_id", "")
        if isinstance(cid, str) and cid:
            if cid in ids:
                v.report(
                    ("sources", sname, "client_id"),
                    f'client id "{cid}" is already used by source "{ids[cid]}": the broker would '
                    "disconnect one whenever the other connects; give each source its own",
                )
            else:
                ids[cid] = sname
        _resolve_tls_files(v, src.get("tls"), ("sources", sname, "tls"), base_dir)


def _check_uplink(v: _Validator, data: dict[str, Any], base_dir: Path) -> None:
    """TLS files must exist; reconnect bounds in order; a batch topic should not name a
    measurement (each publish carries many)."""
    up = data.get("uplink")
    if not isinstance(up, dict):
        return
    _resolve_tls_files(v, up.get("tls"), ("uplink", "tls"), base_dir)
    outbox = up.get("outbox_file", "")
    if isinstance(outbox, str) and outbox and not Path(outbox).is_absolute():
        up["outbox_file"] = str(base_dir / outbox)
    lo, hi = up.get("reconnect_min", 1.0), up.get("reconnect_max", 60.0)
    if _is_number(lo) and _is_number(hi) and lo > hi:
        v.report(("uplink", "reconnect_max"),
                 f"must be >= reconnect_min ({lo} s), got {hi} s")
    topic = up.get("topic", _default(UplinkConfig, "topic"))
    if up.get("format") == "batch" and isinstance(topic, str) and "{name}" in topic:
        v.report(
            ("uplink", "topic"),
            "format = \"batch\" groups records by topic, and {name} makes one topic per "
            "measurement, so batches would hold one record each; use a topic without {name}, "
            'e.g. "flux-edge/{gateway}/{device}"',
            warning=True,
        )
    src_ids = {
        src.get("client_id") for src in data.get("sources", {}).values()
        if src.get("type") == "mqtt" and src.get("client_id")
    }
    cid = up.get("client_id")
    if cid and cid in src_ids:
        v.report(("uplink", "client_id"),
                 f'client id "{cid}" is already used by an MQTT source; give the uplink its own')


def _check_ports(v: _Validator, src_data: dict[str, Any]) -> None:
    owners: dict[str, str] = {}
    for sname, src in src_data.items():
        port = src.get("port")
        if src.get("type") not in ("modbus_rtu", "serial") or not isinstance(port, str) or not port:
            continue
        identity = _port_identity(port)
        if identity in owners:
            v.report(
                ("sources", sname, "port"),
                f'port {_got(port)} is already used by source "{owners[identity]}": a serial '
                "port is one bus, opened by one source; put every device of an RS-485 line "
                "into that source's devices",
            )
        else:
            owners[identity] = sname


def _source_device_names(sname: str, src: dict[str, Any]) -> list[str]:
    if src.get("type") == "modbus_tcp" and "devices" not in src:
        return [src.get("device") or sname]
    return [d["name"] for d in src.get("devices", []) if isinstance(d.get("name"), str)]


def _check_action_targets(v: _Validator, data: dict[str, Any], sources: list[str] | None) -> None:
    src_data: dict[str, Any] = data.get("sources", {})
    act_data: dict[str, Any] = data.get("actions", {})
    for aname, action in act_data.items():
        if action.get("type") == "wasm":
            _check_wasm_target(v, aname, action, act_data)
            continue
        target = action.get("source")
        if sources is None or not isinstance(target, str) or not target:
            continue
        path: Key = ("actions", aname)
        if target not in sources:
            v.report((*path, "source"), _missing_ref("source", target, sources))
            continue
        src = src_data.get(target)
        if src is None:
            continue  # the source itself is broken: already reported
        kind = src.get("type")
        if action.get("type") == "mqtt_publish":
            if kind != "mqtt":
                v.report(
                    (*path, "source"),
                    f'source "{target}" is a {kind} source: mqtt_publish needs an mqtt source '
                    "(its broker connection is used)",
                )
            continue
        if action.get("type") == "serial_write":
            if kind != "serial":
                v.report(
                    (*path, "source"),
                    f'source "{target}" is a {kind} source: serial_write needs a serial source',
                )
            continue
        if kind not in _MODBUS_TYPES:
            v.report(
                (*path, "source"),
                f'source "{target}" is a {kind} source: modbus_write needs a modbus_tcp or '
                "modbus_rtu source",
            )
            continue
        names = _source_device_names(target, src)
        device = action.get("device", "")
        listed = ", ".join(names) or "none"
        if not device and len(names) > 1:
            v.report(
                (*path, "device"),
                f'source "{target}" has {len(names)} devices ({listed}): say which one this '
                'action writes to with device = "..."',
                at="key",
                where=path,
            )
        elif device and device not in names:
            v.report(
                (*path, "device"),
                f'source "{target}" has no device named "{device}"; '
                f"{_suggest(device, names)}its devices: {listed}",
            )


def _check_wasm_target(
    v: _Validator, aname: str, action: dict[str, Any], act_data: dict[str, Any]
) -> None:
    target = action.get("target")
    if not isinstance(target, str) or not target:
        return
    where: Key = ("actions", aname, "target")
    if target not in act_data:
        v.report(where, _missing_ref("action", target, list(act_data)))
        return
    kind = act_data[target].get("type")
    if kind not in ("serial_write", "mqtt_publish"):
        v.report(
            where,
            f'action "{target}" is a {kind} action: a wasm action sends its plugin\'s bytes '
            "through a serial_write or mqtt_publish action",
        )


# --- device profiles and normalization ----------------------------------------------------------


def bundled_profile_dir() -> Path:
    """Where the device profiles shipped with flux-edge live (a copy of config/devices/)."""
    return Path(__file__).resolve().parent / "profiles"


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
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        raw = tomlkit.parse(text).unwrap()
    except (tomlkit.exceptions.TOMLKitError, ValueError, OverflowError) as exc:
        return None, [_syntax_problem(file, exc, _Positions(text))]
    except RecursionError:
        return None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    pv = _Validator(file, _scan(text))
    try:
        data = pv.check(raw, DeviceProfile, ())
    except RecursionError:
        return None, [Problem(file, "", "values are nested too deeply")]
    if data is not _BAD:
        registers = data.get("registers", [])
        _unique_register_names(pv, registers, (), "a profile")
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


def _default(cls: type[msgspec.Struct], name: str) -> Any:
    for field in msgspec.structs.fields(cls):
        if field.name == name:
            return field.default
    raise KeyError(name)


def _normalize(v: _Validator, data: dict[str, Any], base_dir: Path) -> None:
    """Bring every Modbus source to one shape (in place, on checked data): ``devices`` always
    filled (the TCP shorthand becomes one device), each device's registers = its profile's map
    with the device's own entries appended (an entry of the same name replaces the profile's),
    and a device's interval/timeout of 0 replaced by the bus's."""
    daemon = data.get("daemon", {})
    profile_dirs = daemon.get("profile_dirs", DaemonConfig().profile_dirs)
    if not v.clean(("daemon", "profile_dirs")):
        profile_dirs = ()
    cache: dict[Path, list[dict[str, Any]] | None] = {}
    for sname, src in data.get("sources", {}).items():
        kind = src.get("type")
        if kind not in _MODBUS_TYPES:
            continue
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
        interval = src.get("interval", _default(cls, "interval"))
        timeout = src.get("timeout", _default(cls, "timeout"))
        for index, device in enumerate(src.get("devices", [])):
            path: Key = ("sources", sname, "devices", index)
            ref = device.get("profile", "")
            if ref and v.clean((*path, "profile")):
                candidates = _profile_candidates(base_dir, profile_dirs, ref)
                base = _profile_registers(v, candidates, ref, (*path, "profile"), cache)
                if base is not None:
                    own = device.get("registers", [])
                    replaced = {r.get("name") for r in own}
                    device["registers"] = [r for r in base if r.get("name") not in replaced] + own
            device["interval"] = device.get("interval") or interval
            device["timeout"] = device.get("timeout") or timeout
            if not shorthand and not ref and not device.get("registers") and v.clean(path):
                v.report(
                    path,
                    f'device "{device.get("name", "?")}" has no registers and no profile: '
                    "nothing will be read from it",
                    at="key",
                    warning=True,
                )


def source_devices(
    name: str, source: ModbusTcpSource | ModbusRtuSource
) -> tuple[ModbusDeviceConfig, ...]:
    """The devices of a Modbus source, whatever its shape: ``devices`` if given (each with its
    interval/timeout defaulted to the bus's), else the single device of the TCP shorthand (named
    ``device`` or the source's name). Loaded configs are already in this shape; structs built
    in code may not be. Profiles are resolved by the loader only."""
    if source.devices:
        return tuple(
            d
            if d.interval and d.timeout
            else msgspec.structs.replace(
                d, interval=d.interval or source.interval, timeout=d.timeout or source.timeout
            )
            for d in source.devices
        )
    if isinstance(source, ModbusTcpSource):
        return (
            ModbusDeviceConfig(
                name=source.device or name,
                unit_id=source.unit_id,
                registers=source.registers,
                interval=source.interval,
                timeout=source.timeout,
            ),
        )
    return ()


# --- RTU bus budget -----------------------------------------------------------------------------

WARN_UTILISATION = 0.8  # a bus busier than this gets a warning; above 1.0 it is an error


@dataclass(frozen=True, slots=True)
class BusRequest:
    """One read request of an RTU bus's poll plan and what it costs on the line."""

    device: str
    unit_id: int
    read: str  # what it reads, like "read input registers 0..75"
    interval: float  # seconds between two of these requests
    request_bytes: int
    response_bytes: int
    wire: float  # seconds both frames take on the line
    seconds: float  # bus time of the transaction: both frames, two gaps, the turnaround


@dataclass(frozen=True, slots=True)
class BusBudget:
    """How much of an RTU line's time its poll plan needs (see docs/configuration.md)."""

    source: str
    baudrate: int
    framing: str  # like "8E1"
    bits_per_char: int  # 1 start + data bits + parity bit + stop bits
    gap: float  # silence after each frame, seconds
    turnaround: float  # assumed slave response delay, seconds
    requests: tuple[BusRequest, ...]
    utilisation: float  # seconds of traffic per second: 1.0 = the line never rests
    lines: tuple[str, ...]  # the plan, for people

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _every(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%" if fraction < 0.1 else f"{fraction * 100:.0f}%"


def bus_budget(config: Config, source_name: str) -> BusBudget:
    """The line time the poll plan of RTU source ``source_name`` needs.

    Per request: request and response frames at ``1 + bytesize + parity + stopbits`` bits per
    byte, a gap of 3.5 characters (1.75 ms above 19200 baud, or ``inter_frame``) after each
    frame, and the slave's ``turnaround``. Utilisation = the sum over requests of time / interval.
    Retries, timeouts of silent devices and writes come on top. Raises ``KeyError`` for an
    unknown source, ``ValueError`` if it is not a modbus_rtu source or cannot be planned.
    """
    from flux_edge.sources import modbus_plan as plan  # lazy: modbus_plan imports this module

    source = config.sources[source_name]
    if not isinstance(source, ModbusRtuSource):
        raise ValueError(f"source {source_name!r} is not a modbus_rtu source")
    framing = f"{source.bytesize}{source.parity}{source.stopbits}"
    bits = plan.char_bits(source.bytesize, source.parity, source.stopbits)
    char = plan.char_time(source.baudrate, source.bytesize, source.parity, source.stopbits)
    gap = plan.inter_frame_gap(
        source.baudrate, source.bytesize, source.parity, source.stopbits, source.inter_frame
    )
    if source.inter_frame > 0:
        gap_how = "inter_frame"
    elif source.baudrate > plan.RTU_FAST_BAUD:
        gap_how = f"fixed above {plan.RTU_FAST_BAUD} baud"
    else:
        gap_how = "3.5 characters"
    requests: list[BusRequest] = []
    for device in source_devices(source_name, source):
        for group in plan.plan_device(device, source.interval, source.max_gap):
            for block in group.blocks:
                wire = plan.transaction_time(block, char, 0.0)
                requests.append(
                    BusRequest(
                        device=device.name,
                        unit_id=device.unit_id,
                        read=block.describe(),
                        interval=group.interval,
                        request_bytes=plan.request_bytes(block),
                        response_bytes=plan.response_bytes(block),
                        wire=wire,
                        seconds=plan.transaction_time(block, char, gap) + source.turnaround,
                    )
                )
    utilisation = sum(r.seconds / r.interval for r in requests)
    lines = [
        f"bus {source_name} ({source.port}): {source.baudrate} baud {framing} = {bits} bits "
        f"per byte, {char * 1000:.3f} ms each; gap after each frame {_ms(gap)} ({gap_how}); "
        f"slave turnaround {_ms(source.turnaround)} (assumed: set turnaround)"
    ]
    for r in requests:
        total = r.request_bytes + r.response_bytes
        lines.append(
            f"  {r.device} unit {r.unit_id}: {r.read} every {_every(r.interval)}: "
            f"{r.request_bytes} B + {r.response_bytes} B = {total} B -> {_ms(r.wire)} "
            f"+ {_ms(r.seconds - r.wire)} gaps and turnaround = {_ms(r.seconds)} "
            f"({_pct(r.seconds / r.interval)})"
        )
    verdict = " > 100%" if utilisation > 1 else " > 80%" if utilisation > WARN_UTILISATION else ""
    lines.append(
        f"bus {source_name}: {source.baudrate} baud {framing}: {utilisation:.3g} s of traffic "
        f"per 1 s = {_pct(utilisation)}{verdict}"
    )
    return BusBudget(
        source=source_name,
        baudrate=source.baudrate,
        framing=framing,
        bits_per_char=bits,
        gap=gap,
        turnaround=source.turnaround,
        requests=tuple(requests),
        utilisation=utilisation,
        lines=tuple(lines),
    )


def _check_budgets(v: _Validator, config: Config) -> None:
    for name, source in config.sources.items():
        if not isinstance(source, ModbusRtuSource):
            continue
        path: Key = ("sources", name)
        try:
            budget = bus_budget(config, name)
        except ValueError as exc:
            v.report(path, f"the bus's read plan cannot be made: {exc}", at="key")
            continue
        plan = "\n".join("    " + line for line in budget.lines)
        share = _pct(budget.utilisation)
        if budget.utilisation > 1:
            v.report(
                path,
                f"the RTU bus is overcommitted: its polls need {share} of the line's time "
                "(more than 100%), so polls would fall behind their intervals; poll less "
                "often, read fewer registers, raise the baud rate or split the devices over "
                f"two lines. The plan:\n{plan}",
                at="key",
            )
        elif budget.utilisation > WARN_UTILISATION:
            v.report(
                path,
                f"the RTU bus is busy: its polls need {share} of the line's time (more than "
                f"80%), leaving little for retries, a silent device's timeouts and writes. "
                f"The plan:\n{plan}",
                at="key",
                warning=True,
            )


def _check_conditions(v: _Validator, data: dict[str, Any]) -> None:
    """Type-check every rule condition with the rules engine (CEL), if it is importable."""
    if not v.clean(("sources",)) or not data.get("rules"):
        return  # a broken source would make every rule using its registers look wrong
    try:
        engine = importlib.import_module("flux_edge.rules.engine")
    except ModuleNotFoundError as exc:
        if exc.name in ("flux_edge.rules", "flux_edge.rules.engine"):
            return  # not part of this build yet
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    except ImportError as exc:
        v.report((), f"rule conditions were not checked: {exc}", warning=True)
        return
    check_rules: Callable[[Config], list[Any]] = engine.check_rules
    salvage: dict[str, Any] = {}
    for section in ("plugins", "sources", "rules", "actions", "actuators"):
        entries = data.get(section, {})
        salvage[section] = {k: e for k, e in entries.items() if v.clean((section, k))}
    if v.clean(("daemon",)) and "daemon" in data:
        salvage["daemon"] = data["daemon"]
    try:
        config = msgspec.convert(salvage, Config)
    except msgspec.ValidationError:
        return
    try:
        errors = check_rules(config)
    except FluxError as exc:
        errors = [exc]
    for err in errors:
        rule = getattr(err, "rule", "")
        column = int(getattr(err, "column", 0) or 0)
        # a condition other than a rule's `when` (off_when, an actuator's interlock) says which
        key = getattr(err, "key", None)
        path: Key = tuple(key) if key else ("rules", rule, "when")
        line, col = v.pos.value(path)
        if column > 0:
            line, col = v.pos.in_string(path, column - 1) or (line, col)
        v.problems.append(Problem(v.file, _fmt_path(path), str(err), line, col))
        v.dirty.add(path)
    _check_rule_tests_run(v, config)


def _check_rule_tests_run(v: _Validator, config: Config) -> None:
    """Run the rules' own test cases (in simulated time; no device is touched)."""
    tested = {
        name: rule for name, rule in config.rules.items() if rule.tests and v.clean(("rules", name))
    }
    if not tested:
        return
    try:
        replay = importlib.import_module("flux_edge.rules.replay")
    except ImportError as exc:
        v.report((), f"rule test cases were not run: {exc}", warning=True)
        return
    run: Callable[[Config], list[Any]] = replay.check_rule_tests
    for result in run(msgspec.structs.replace(config, rules=tested)):
        if not result.ok:
            v.report(("rules", result.rule, "tests", result.index), str(result), at="key")


# --- entry points -------------------------------------------------------------------------------

_AT_LINE = re.compile(r" at line \d+ col \d+$")


def _syntax_problem(file: str, exc: Exception, positions: _Positions) -> Problem:
    message = _AT_LINE.sub("", str(exc))
    line = getattr(exc, "line", 0) or 0
    col = getattr(exc, "col", -1)
    column = col + 1 if isinstance(col, int) and col >= 0 and line else 0
    if "already exists" in message or "Redefinition" in message:
        with contextlib.suppress(_ScanError, RecursionError):
            _Scanner(positions.text, positions).run()
        if positions.duplicate is not None:
            line, column = positions.linecol(positions.duplicate)
        message = message.rstrip(".") + ": each key and table may be defined only once"
    elif message == "Unexpected character: '\\n'":
        message = "unexpected end of line: a value, a closing quote or a bracket is missing"
    return Problem(file, "", f"invalid TOML: {message}", line, column)


def _check(text: str, file: str, config_path: str) -> tuple[Config | None, list[Problem]]:
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        raw = tomlkit.parse(text).unwrap()
    except (tomlkit.exceptions.TOMLKitError, ValueError, OverflowError) as exc:
        return None, [_syntax_problem(file, exc, _Positions(text))]
    except RecursionError:
        return None, [Problem(file, "", "invalid TOML: values are nested too deeply")]
    positions = _scan(text)
    v = _Validator(file, positions)
    base_dir = Path(config_path).parent if config_path else Path.cwd()
    try:
        data = v.check(raw, Config, ())
        if data is not _BAD:
            _cross_check(v, raw, data, base_dir)
            _normalize(v, data, base_dir)
            _check_actuators(v, data, _names(raw, "actions"))
            _check_conditions(v, data)
    except RecursionError:
        v.report((), "values are nested too deeply")
    config = None
    if v.errors == 0:
        data["path"] = config_path
        try:
            config = msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:  # a gap between this validator and the schema
            v.report((), f"internal error: the checked configuration was refused: {exc}")
        if config is not None:
            _check_budgets(v, config)
            if v.errors:
                config = None
    # this file's problems first, by position; then those of profile files it uses
    problems = sorted(
        v.problems, key=lambda p: (p.file != file, p.file, p.line == 0, p.line, p.column)
    )
    return config, problems


def _split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    errors = [p for p in problems if p.severity == "error"]
    return errors, [p for p in problems if p.severity != "error"]


def check_config_text(text: str, path: str = "<string>") -> tuple[Config | None, list[Problem]]:
    """Like ``check_config`` for text in memory. ``path`` names it in problems; unless it is
    ``"<...>"`` it also sets ``Config.path`` (so relative plugin paths resolve next to it)."""
    config_path = "" if path.startswith("<") else str(Path(path).resolve())
    return _check(text, path, config_path)


def check_config(path: str | Path) -> tuple[Config | None, list[Problem]]:
    """Load and check a configuration file; never raises for a bad file.

    Returns ``(config, problems)``: every problem found, errors and warnings (``Problem.severity``),
    sorted by position. ``config`` is ``None`` when there is any error. ``flux-edge check-config``
    prints the problems and exits 0 without errors, 78 with.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, [Problem(file, "", f"cannot read the configuration: {exc.strerror or exc}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        return None, [Problem(file, "", message, line, column)]
    return _check(text, file, str(Path(path).resolve()))


def _finish(config: Config | None, problems: list[Problem]) -> Config:
    errors, warnings = _split(problems)
    if errors or config is None:
        raise ConfigError(errors or problems)
    for warning in warnings:
        _log.warning("%s", warning)
    return config


def load_config(path: str | Path) -> Config:
    """Load a configuration file. Raises ``ConfigError`` holding every error; warnings are logged
    (use ``check_config`` to get them)."""
    return _finish(*check_config(path))


def load_config_text(text: str, path: str = "<string>") -> Config:
    """Load configuration text (``path`` as in ``check_config_text``). Raises ``ConfigError``."""
    return _finish(*check_config_text(text, path))
