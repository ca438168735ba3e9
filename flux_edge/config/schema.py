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
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from flux_edge.config.values import (
    CEL_KEYS,
    DURATION,
    HOST,
    INPUT_REF,
    LOG_LEVEL,
    MODULE,
    NAME,
    NAME_KEYS,
    SECRET,
    SECRET_PATH,
    SHA256,
    SIZE,
)

Order = Literal["big", "little"]
Parity = Literal["N", "E", "O"]


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


Table = _S  # the base of every config table's struct: frozen, keyword-only, unknown keys refused


class DaemonConfig(_S, frozen=True):
    name: Annotated[str, NAME] = ""  # gateway id; default: the host name
    # plugin cache lives in state_dir/cache
    state_dir: Annotated[str, Meta(min_length=1)] = "/var/lib/flux-edge"
    # searched for <module>.wasm, relative to config
    plugin_dirs: tuple[Annotated[str, Meta(min_length=1)], ...] = ("plugins",)
    # searched for <profile>.toml, relative to config
    profile_dirs: tuple[Annotated[str, Meta(min_length=1)], ...] = ("devices",)
    # capacity of each queue between stages
    queue_size: Annotated[int, Meta(ge=1, le=10_000_000)] = 10000
    batch_max: Annotated[int, Meta(ge=1, le=65_536)] = 256  # most messages per plugin call
    log_level: Annotated[str, LOG_LEVEL] = "info"
    audit_file: str = ""  # default: <state_dir>/audit.jsonl
    # rotate the audit log past this size
    audit_max_size: Annotated[int, Meta(ge=4096, le=2**40), SIZE] = 4 * 1024 * 1024
    audit_keep: Annotated[int, Meta(ge=0, le=1000)] = 5  # rotated audit files kept
    # a stage busy with one unit of work longer than this counts as stuck: the systemd watchdog
    # is no longer fed, /healthz answers 503 and systemd restarts the service
    stall_timeout: Annotated[float, Meta(ge=1, le=3600), DURATION] = 30.0
    # SIGTERM: longest drain (queues, actions, uplink flush)
    shutdown_timeout: Annotated[float, Meta(ge=0.1, le=3600), DURATION] = 20.0


class PluginConfig(_S, frozen=True):
    # looked up as <module>.wasm in plugin_dirs, then bundled; default: table name
    module: Annotated[str, MODULE] = ""
    file: str = ""  # explicit .wasm path (relative to the config file); excludes ``module``
    timeout: Annotated[float, Meta(le=3600, gt=0), DURATION] = 0.05  # wall time per call, seconds
    # bytes of linear memory
    memory_limit: Annotated[int, Meta(ge=64 * 1024, le=2**30), SIZE] = 16 * 1024 * 1024
    # consecutive failed calls before quarantine
    max_failures: Annotated[int, Meta(ge=1, le=1_000_000)] = 3
    # seconds a quarantined plugin is left alone before a retry
    quarantine: Annotated[float, Meta(ge=0), DURATION] = 60.0
    # records about one input message; more: one error record for that message instead
    max_records_per_message: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    # bytes of output of one call; more: the call fails (every message an error record)
    max_output_bytes: Annotated[int, Meta(ge=4096, le=2**30), SIZE] = 4 * 1024 * 1024
    # pin the .wasm file: 64 hex digits (sha256sum FILE); a different file is refused
    sha256: Annotated[str, SHA256] = ""
    wasi: bool = False  # grant WASI (no preopened dirs, no env, no args) when true
    config: dict[str, Any] = {}  # passed as JSON to the plugin's flux_init


class TlsConfig(_S, frozen=True):
    """TLS towards an MQTT broker. Paths are relative to the config file."""

    ca_file: str = ""  # CA bundle (PEM) that signed the broker's certificate; "" = system CAs
    # client certificate (PEM) for mutual TLS; a path or { credential = "name" } (systemd)
    cert_file: Annotated[str, SECRET_PATH] = ""
    # its private key (PEM); "" = inside cert_file; a path or { credential = "name" }
    key_file: Annotated[str, SECRET_PATH] = ""
    verify_hostname: bool = True  # the broker's certificate must name the host we dial


class SourceSpec(_S, frozen=True, tag_field="type"):
    """The config struct of a source kind (one per module beside its domain: see
    ``flux_edge.config.kinds``). Every source's readings go through its plugin ``chain``.

    The methods answer, for any kind, what the rest of the daemon asks of a source entry."""

    chain: tuple[Annotated[str, Meta(min_length=1)], ...] = ()  # plugin names, applied in order

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

    t: Annotated[float, Meta(ge=0), DURATION] = 0.0
    device: Annotated[str, NAME] = ""  # default: the rule's device
    name: Annotated[str, Meta(min_length=1)]
    value: bool | int | float | str
    quality: Literal["good", "stale", "bad"] = "good"


class RuleTest(_S, frozen=True, kw_only=True):
    """given measurements -> the actions the rule must ask for, in order (run by check-config and
    `flux-edge rules test`)."""

    name: str = ""
    given: tuple[RuleTestStep, ...]
    expect: tuple[str, ...] = ()  # action names, in firing order ("" list = must not fire)
    # evaluate pending `for` timers up to this time (default: the last step)
    at: Annotated[float, Meta(ge=0), DURATION] = -1.0


class RuleConfig(_S, frozen=True):
    # CEL condition; variables: the device's measurements, previous/delta/age maps
    when: Annotated[str, Meta(min_length=1)]
    actions: tuple[Annotated[str, Meta(min_length=1)], ...]
    device: str = ""  # only this device's measurements trigger the rule; "" = any device
    mode: Literal["edge", "level"] = "edge"  # edge: fire once on becoming true
    # extra variables' types
    inputs: Annotated[
        dict[str, Literal["bool", "int", "double", "string"]], CEL_KEYS
    ] = {}
    description: str = ""
    # must hold this long before firing
    for_: Annotated[float, Meta(ge=0), DURATION] = msgspec.field(default=0.0, name="for")
    off_when: str = ""  # hysteresis: once fired, the rule re-arms only when this is true
    # run when the rule re-arms (hysteresis) or goes false
    off_actions: tuple[Annotated[str, Meta(min_length=1)], ...] = ()
    cooldown: Annotated[float, Meta(ge=0), DURATION] = 0.0  # after firing, not again for this long
    # an input older than this counts as stale; 0 = no age limit
    max_age: Annotated[float, Meta(ge=0), DURATION] = 0.0
    allow_stale: bool = False  # stale/bad inputs may satisfy the condition (default: never)
    severity: Literal["debug", "info", "warning", "error"] = "info"  # log level when it fires
    # cost units one evaluation may take (flux_edge/rules/cost.py); 0 = the default, 50,000
    max_cost: Annotated[int, Meta(ge=0, le=10_000_000)] = 0
    tests: tuple[RuleTest, ...] = ()


class ActuatorConfig(_S, frozen=True):
    """The safety layer in front of one physical actuator (a burner, a pump, a valve) driven by
    an "on" and an "off" action. Every command to those actions passes through it."""

    on: Annotated[str, Meta(min_length=1)]  # action that switches it on
    off: Annotated[str, Meta(min_length=1)]  # action that switches it off
    # the state applied on shutdown, on a watchdog stop and when inputs go stale
    safe: Literal["on", "off", "none"] = "off"
    # once on, not switched off before this long (anti-chatter)
    min_on: Annotated[float, Meta(ge=0), DURATION] = 0.0
    # once off, not switched on before this long
    min_off: Annotated[float, Meta(ge=0), DURATION] = 0.0
    # at most this many switches per `window`; 0 = unlimited
    max_switches: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    window: Annotated[float, Meta(gt=0), DURATION] = 3600.0
    interlock: str = ""  # CEL: while true, switching ON is blocked (and it is driven to safe)
    # the device whose values the interlock reads
    interlock_device: Annotated[str, NAME] = ""
    # device.measurement names this actuator depends on; if any goes
    inputs: tuple[Annotated[str, Meta(min_length=1), INPUT_REF], ...] = ()
    #                               stale/bad, the safe state is applied
    # an input older than this counts as stale; 0 = quality only
    stale_after: Annotated[float, Meta(ge=0), DURATION] = 0.0


class MetricsConfig(_S, frozen=True):
    """Prometheus metrics (GET /metrics) and a health check (GET /healthz) over local HTTP."""

    enabled: bool = True
    # "0.0.0.0" exposes them to the network: mind the firewall
    host: Annotated[str, Meta(min_length=1), HOST] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9180


class ConsoleConfig(_S, frozen=True):
    """The local web console and its JSON API (/api/v1): docs/console.md. Off unless enabled;
    every request needs a login (or a token); a bind beyond loopback needs TLS."""

    enabled: bool = False
    # a non-loopback host (the LAN) requires TLS: check-config refuses tls = "off" there
    host: Annotated[str, Meta(min_length=1), HOST] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9181
    # "auto": TLS unless host is a loopback address
    tls: Literal["auto", "on", "off"] = "auto"
    cert_file: str = ""  # PEM certificate; "" = self-signed, made in <state_dir>/console/
    key_file: str = ""  # its private key (PEM); "" = inside cert_file
    users_file: str = ""  # password hashes and tokens; "" = <state_dir>/console/users.json
    # a session ends this long after login, or after idle_timeout without a request
    session_timeout: Annotated[float, Meta(ge=60, le=30 * 86400), DURATION] = 8 * 3600.0
    idle_timeout: Annotated[float, Meta(ge=60, le=30 * 86400), DURATION] = 1800.0
    # failed logins from one address (or for one user) within login_window before refusal
    login_attempts: Annotated[int, Meta(ge=1, le=1000)] = 5
    login_window: Annotated[float, Meta(ge=1, le=86400), DURATION] = 300.0
    trend: Annotated[float, Meta(ge=10, le=86400), DURATION] = 600.0  # history per value
    trend_points: Annotated[int, Meta(ge=2, le=10_000)] = 120  # points kept per value
    log_lines: Annotated[int, Meta(ge=0, le=100_000)] = 500  # recent log records kept
    max_clients: Annotated[int, Meta(ge=1, le=256)] = 8  # live (SSE) streams at once


class UplinkConfig(_S, frozen=True):
    """Every measurement forwarded to an upstream MQTT broker through a durable outbox."""

    host: Annotated[str, Meta(min_length=1), HOST]
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    client_id: str = ""  # default: flux-edge-<daemon.name>-uplink
    username: str = ""
    # "text", { file = "/path" } or { credential = "name" } (systemd LoadCredential=)
    password: Annotated[str, SECRET] = ""
    keepalive: Annotated[float, Meta(ge=0, le=65535), DURATION] = 30.0
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None  # set (even empty: tls = {}) to connect with TLS
    # 0, 1 or 2; every record goes through the outbox and is deleted once the broker has
    # acknowledged it (QoS 1/2) or once it is written to the connection (QoS 0)
    qos: Annotated[int, Meta(ge=0, le=2)] = 1
    # the payload format: [uplink.encoder] type = "records" (default), "json", "influx",
    # "sparkplug_b", "thingsboard", "homeassistant"; its options in docs/northbound.md
    encoder: dict[str, Any] = {}
    # more upstream brokers at once, each a table like [uplink] (its own encoder, outbox and
    # connection): [uplink.extra.NAME]; checked by the uplink's domain (docs/northbound.md)
    extra: dict[str, dict[str, Any]] = {}
    # topic of each publish; {gateway}, {source}, {device} and {name} are filled in
    topic: Annotated[str, Meta(min_length=1)] = "flux-edge/{gateway}/{device}/{name}"
    # "single": one JSON object per publish; "batch": a JSON array of up to batch_max records
    # that share a topic (use a topic without {name}, e.g. "flux-edge/{gateway}/{device}")
    format: Literal["single", "batch"] = "single"
    batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 100
    # retained "online"; the broker publishes "offline" (last will) when the link dies
    status_topic: str = "flux-edge/{gateway}/status"
    # publishes awaiting the broker's acknowledgement
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 100
    reconnect_min: Annotated[float, Meta(gt=0), DURATION] = 1.0
    reconnect_max: Annotated[float, Meta(gt=0), DURATION] = 60.0
    outbox_file: str = ""  # default: <state_dir>/outbox.sqlite
    # when full, the oldest records are dropped (counted)
    outbox_max_size: Annotated[int, Meta(ge=64 * 1024, le=2**40), SIZE] = 64 * 1024 * 1024
    # group commit: at most one SQLite commit per this interval
    commit_interval: Annotated[float, Meta(ge=0, le=10), DURATION] = 0.02
    # fsync (WAL checkpoint) at most this often: power-loss window
    sync_interval: Annotated[float, Meta(ge=0, le=3600), DURATION] = 1.0
    # "memory": the outbox stays in memory while the broker acknowledges promptly and is
    # written to the file only once records have waited spill_after (SD-card wear; what a crash
    # or power cut can lose: docs/operations.md)
    outbox_mode: Literal["disk", "memory"] = "disk"
    spill_after: Annotated[float, Meta(gt=0, le=3600), DURATION] = 5.0


class Config(_S, frozen=True):
    daemon: DaemonConfig = DaemonConfig()
    plugins: Annotated[dict[str, PluginConfig], NAME_KEYS] = {}
    # each entry a registered source kind's struct
    sources: Annotated[dict[str, SourceSpec], NAME_KEYS] = {}
    rules: Annotated[dict[str, RuleConfig], NAME_KEYS] = {}
    # each entry a registered action kind's struct
    actions: Annotated[dict[str, ActionSpec], NAME_KEYS] = {}
    actuators: Annotated[dict[str, ActuatorConfig], NAME_KEYS] = {}
    uplink: UplinkConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    console: ConsoleConfig = ConsoleConfig()
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
