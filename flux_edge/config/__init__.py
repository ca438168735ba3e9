"""TOML configuration -> typed, frozen config. The ONE place config is validated.

Schema (the Structs below) is the contract the rest of the daemon reads. Durations are given in
TOML as strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and stored as float
seconds; sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int bytes.

The package, module by module: ``schema`` (the Structs), ``values`` (durations, sizes, names),
``positions`` (the TOML position scanner), ``validate`` (the schema pass and per-field rules),
``tables`` (checks across the fields of one table), ``references`` (checks across tables),
``plugin_files``, ``profiles`` (device profiles, Modbus normalization), ``budget`` (RTU bus
time), ``load`` (the passes and the entry points).

Loading happens in passes, each collecting *every* problem it finds (docs/configuration.md):

1. syntax: tomlkit parses the text; a syntax error is reported with its line and column;
2. schema: the whole document is walked against the Structs (unknown keys with a suggestion,
   types deep in lists, missing keys, durations, sizes, ranges), each problem placed at the line
   and column of the offending key or value by a small position scanner
   (``positions._Scanner``), since tomlkit does not expose positions;
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

from flux_edge.config.budget import WARN_UTILISATION, BusBudget, BusRequest, bus_budget
from flux_edge.config.load import check_config, check_config_text, load_config, load_config_text
from flux_edge.config.plugin_files import (
    bundled_plugin_dir,
    plugin_search_paths,
    resolve_plugin_path,
)
from flux_edge.config.profiles import (
    bundled_profile_dir,
    load_profile,
    profile_search_paths,
    source_devices,
)
from flux_edge.config.schema import (
    REGISTER_WORDS,
    ActionConfig,
    ActuatorConfig,
    Config,
    DaemonConfig,
    DeviceProfile,
    MetricsConfig,
    ModbusDeviceConfig,
    ModbusRtuSource,
    ModbusTcpSource,
    ModbusWriteAction,
    MqttPublishAction,
    MqttSource,
    MqttSubscription,
    Order,
    Parity,
    PluginConfig,
    ProfileInfo,
    RegisterConfig,
    RegisterFunction,
    RegisterType,
    RuleConfig,
    RuleTest,
    RuleTestStep,
    SerialSource,
    SerialWriteAction,
    SourceConfig,
    TlsConfig,
    UplinkConfig,
    WasmAction,
)
from flux_edge.config.values import (
    DURATION_HELP,
    SIZE_HELP,
    parse_duration,
    parse_size,
)

__all__ = [
    "DURATION_HELP",
    "REGISTER_WORDS",
    "SIZE_HELP",
    "WARN_UTILISATION",
    "ActionConfig",
    "ActuatorConfig",
    "BusBudget",
    "BusRequest",
    "Config",
    "DaemonConfig",
    "DeviceProfile",
    "MetricsConfig",
    "ModbusDeviceConfig",
    "ModbusRtuSource",
    "ModbusTcpSource",
    "ModbusWriteAction",
    "MqttPublishAction",
    "MqttSource",
    "MqttSubscription",
    "Order",
    "Parity",
    "PluginConfig",
    "ProfileInfo",
    "RegisterConfig",
    "RegisterFunction",
    "RegisterType",
    "RuleConfig",
    "RuleTest",
    "RuleTestStep",
    "SerialSource",
    "SerialWriteAction",
    "SourceConfig",
    "TlsConfig",
    "UplinkConfig",
    "WasmAction",
    "bundled_plugin_dir",
    "bundled_profile_dir",
    "bus_budget",
    "check_config",
    "check_config_text",
    "load_config",
    "load_config_text",
    "load_profile",
    "parse_duration",
    "parse_size",
    "plugin_search_paths",
    "profile_search_paths",
    "resolve_plugin_path",
    "source_devices",
]
