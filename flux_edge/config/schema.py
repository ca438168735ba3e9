"""The configuration schema: frozen msgspec Structs that the rest of the daemon reads.

Durations are given in TOML as strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and
stored as float seconds; sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int
bytes. The constraints the types alone do not carry are in ``validate._RULES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

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


# Registers (16-bit words) each register type takes; a "string" takes its ``count``. The one
# table of these widths: sources/modbus/plan.py reads it too.
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

def _default(cls: type[msgspec.Struct], name: str) -> Any:
    for field in msgspec.structs.fields(cls):
        if field.name == name:
            return field.default
    raise KeyError(name)
