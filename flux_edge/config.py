"""TOML configuration -> typed, frozen config. The ONE place config is validated.

Schema (the Structs below) is the contract the rest of the daemon reads. Durations are given in
TOML as strings ("50ms", "1s", "2m", "1h") or numbers of seconds and stored as float seconds;
sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int bytes.

STATUS: schema fixed; the loader (load_config / check) is being written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

RegisterFunction = Literal["coil", "discrete", "holding", "input"]
RegisterType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DaemonConfig(_S):
    name: str = ""  # gateway id; default: the host name
    state_dir: str = "/var/lib/flux-edge"  # plugin cache lives in state_dir/cache
    plugin_dirs: tuple[str, ...] = ("plugins",)  # searched for <module>.wasm, relative to config
    queue_size: int = 10000  # capacity of each queue between stages
    batch_max: int = 256  # most messages per plugin call
    log_level: str = "info"


class PluginConfig(_S):
    module: str = ""  # looked up as <module>.wasm in plugin_dirs, then bundled; default: table name
    file: str = ""  # explicit .wasm path (relative to the config file); excludes ``module``
    timeout: float = 0.05  # wall time per call, seconds
    memory_limit: int = 16 * 1024 * 1024  # bytes of linear memory
    max_failures: int = 3  # consecutive failed calls before quarantine
    quarantine: float = 60.0  # seconds a quarantined plugin is left alone before a retry
    wasi: bool = False  # grant WASI (no preopened dirs, no env, no args) when true
    config: dict[str, Any] = {}  # passed as JSON to the plugin's flux_init


class RegisterConfig(_S):
    name: str  # a CEL identifier: [A-Za-z_][A-Za-z0-9_]*
    address: int  # 0..65535
    function: RegisterFunction = "holding"
    type: RegisterType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""


class ModbusTcpSource(_S, tag="modbus_tcp", tag_field="type"):
    host: str
    port: int = 502
    unit_id: int = 1
    interval: float = 1.0  # seconds between polls
    timeout: float = 1.0  # seconds per request
    device: str = ""  # device name for measurements; default: the source's table name
    chain: tuple[str, ...] = ()  # plugin names, applied in order
    max_gap: int = 8  # registers a coalesced read may skip over
    registers: tuple[RegisterConfig, ...] = ()


SourceConfig = ModbusTcpSource


class RuleConfig(_S):
    when: str  # CEL condition
    actions: tuple[str, ...]
    device: str = ""  # only this device's measurements trigger the rule; "" = any device
    mode: Literal["edge", "level"] = "edge"  # edge: fire once on becoming true
    inputs: dict[str, Literal["bool", "int", "double", "string"]] = {}  # extra variables' types
    description: str = ""


class ModbusWriteAction(_S, tag="modbus_write", tag_field="type"):
    source: str  # the modbus source whose connection and unit id are used
    address: int
    value: bool | int
    function: Literal["coil", "holding"] = "coil"
    verify: bool = True  # read back and compare
    timeout: float = 1.0


ActionConfig = ModbusWriteAction


class Config(_S):
    daemon: DaemonConfig = DaemonConfig()
    plugins: dict[str, PluginConfig] = {}
    sources: dict[str, SourceConfig] = {}
    rules: dict[str, RuleConfig] = {}
    actions: dict[str, ActionConfig] = {}
    # Set by the loader, not by the file:
    path: str = ""  # the file it was loaded from

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()
