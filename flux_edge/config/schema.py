"""The configuration schema: frozen msgspec Structs that the rest of the daemon reads.

The structs config owns (daemon, plugins, rules, actuators, metrics, uplink, TLS) and the bases of
the kinds' structs: every ``[sources.X]`` entry is a ``SourceSpec`` and every ``[actions.X]`` an
``ActionSpec`` subclass declared by its kind's module (``flux_edge.config.kinds``).

Durations are given in TOML as strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and
stored as float seconds; sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int
bytes. The constraints the types alone do not carry are in ``validate._RULES`` (config's own
structs) and in each kind's ``rules``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec

Order = Literal["big", "little"]
Parity = Literal["N", "E", "O"]


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


Table = _S  # the base of every config table's struct: frozen, keyword-only, unknown keys refused


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


class TlsConfig(_S, frozen=True):
    """TLS towards an MQTT broker. Paths are relative to the config file."""

    ca_file: str = ""  # CA bundle (PEM) that signed the broker's certificate; "" = system CAs
    cert_file: str = ""  # client certificate (PEM) for mutual TLS
    key_file: str = ""  # its private key (PEM); "" = inside cert_file
    verify_hostname: bool = True  # the broker's certificate must name the host we dial


class SourceSpec(_S, frozen=True, tag_field="type"):
    """The config struct of a source kind (one per module beside its domain: see
    ``flux_edge.config.kinds``). Every source's readings go through its plugin ``chain``.

    The methods answer, for any kind, what the rest of the daemon asks of a source entry."""

    chain: tuple[str, ...] = ()  # plugin names, applied in order

    def chain_keys(self, name: str) -> tuple[str, ...]:
        """The devices that get a chain of their own (plugin instances learn their device);
        ``""``: one chain for the whole source."""
        return ("",)

    def plugin_context(self, name: str, key: str) -> dict[str, Any]:
        """What a plugin instance of chain ``key`` learns about what it serves, beyond the
        source's name and type (ABI v1's ``source`` object)."""
        return {}

    def declared_points(self, name: str) -> dict[str, list[tuple[str, str]]]:
        """device -> (point, CEL type: bool | double | string) that the config declares for it
        (Modbus registers); rules are type-checked against these."""
        return {}


class ActionSpec(_S, frozen=True, tag_field="type"):
    """The config struct of an action kind. The class variables tell the runtime how to run
    it."""

    # commands to it may run at the same time (unless it drives an actuator)
    concurrent: ClassVar[bool] = False
    # a successful command is logged at info (a device write), not debug
    writes_device: ClassVar[bool] = False
    # built after the other actions (it sends through one of them)
    builds_late: ClassVar[bool] = False

    def plugin_name(self) -> str:
        """The [plugins.NAME] this action calls; "" for none."""
        return ""


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
    sources: dict[str, SourceSpec] = {}  # each entry a registered source kind's struct
    rules: dict[str, RuleConfig] = {}
    actions: dict[str, ActionSpec] = {}  # each entry a registered action kind's struct
    actuators: dict[str, ActuatorConfig] = {}
    uplink: UplinkConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    # Set by the loader, not by the file:
    path: str = ""  # the file it was loaded from

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()


def _default(cls: type[msgspec.Struct], name: str) -> Any:
    for field in msgspec.structs.fields(cls):
        if field.name == name:
            return field.default
    raise KeyError(name)
