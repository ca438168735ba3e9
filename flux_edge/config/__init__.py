"""TOML configuration -> typed, frozen config. The ONE place config is validated.

Schema (``schema``) is the contract the rest of the daemon reads. Durations are given in TOML as
strings ("50ms", "1s", "2m", "1h", "1h30m") or numbers of seconds and stored as float seconds;
sizes as "16MiB"/"512KiB"/"1GB" or a number of bytes and stored as int bytes.

This package is the mechanism and names no domain: each source and action kind declares its
struct, its checks and its factory beside its own code (``kinds.Kind``), each domain what it adds
(``kinds.Domain``: rules, actuators, the uplink), and ``flux_edge.kinds`` collects them and binds
the entry points (``flux_edge.kinds.load_config`` etc.). Module by module: ``schema`` (the
structs config owns, and ``SourceSpec``/``ActionSpec``, the bases of the kinds' structs),
``kinds`` (the interface), ``values`` (durations, sizes, names), ``positions`` (the TOML position
scanner), ``validate`` (the schema walk and per-field rules), ``tables`` (checks across one
table's fields), ``references`` (checks across tables no kind owns), ``plugin_files``, ``load``
(the passes).

Loading happens in passes, each collecting *every* problem it finds (docs/configuration.md):

0. limits: a regular file of at most 2 MiB (``load.MAX_CONFIG_BYTES``), UTF-8 text (UTF-16/32
   and NUL bytes said so), then integers within 64 bits and nesting within 32 levels, each
   reported at its key; whatever else goes wrong is a problem of the file, never a traceback;
1. syntax: the standard library's tomllib parses the text; a document it refuses is given to
   tomlkit for the message (line, column; a duplicate key with the lines of both);
2. schema: the whole document is walked against the structs (unknown keys with a suggestion,
   types deep in lists, missing keys, durations, sizes, ranges), a source or action table against
   the struct of the kind its ``type`` names; each problem placed at the line and column of the
   offending key or value by a small position scanner (``positions._Scanner``, run only once a
   problem is to be placed), since no TOML parser exposes positions;
3. references: chains name plugins, plugin files exist, device names are unique, one source per
   serial port; then each entry's kind (``Kind.cross_check``: an action's source) and each domain
   (``Domain.references``: rules name actions);
4. normalization: each kind's ``normalize`` (a Modbus source gets ``devices`` and its profiles'
   register maps); then each domain's ``semantic`` pass (actuators, rule conditions, rule tests);
5. the structs are built; each kind's ``built_check`` (an RTU bus's time budget) and each
   domain's ``built`` pass run on them.
"""

from flux_edge.config.kinds import Context, Device, Devices, Domain, Kind, Kinds, Registry
from flux_edge.config.load import build_config
from flux_edge.config.plugin_files import (
    bundled_plugin_dir,
    plugin_search_paths,
    resolve_plugin_path,
)
from flux_edge.config.schema import (
    ActionSpec,
    ActuatorConfig,
    Config,
    ConsoleConfig,
    DaemonConfig,
    MetricsConfig,
    Order,
    Parity,
    PluginConfig,
    RuleConfig,
    RuleTest,
    RuleTestStep,
    SourceSpec,
    Table,
    TlsConfig,
    UplinkConfig,
)
from flux_edge.config.values import (
    DURATION,
    DURATION_HELP,
    HOST,
    NAME,
    SIZE,
    SIZE_HELP,
    Key,
    Rule,
    parse_duration,
    parse_size,
)

__all__ = [
    "DURATION",
    "DURATION_HELP",
    "HOST",
    "NAME",
    "SIZE",
    "SIZE_HELP",
    "ActionSpec",
    "ActuatorConfig",
    "Config",
    "ConsoleConfig",
    "Context",
    "DaemonConfig",
    "Device",
    "Devices",
    "Domain",
    "Key",
    "Kind",
    "Kinds",
    "MetricsConfig",
    "Order",
    "Parity",
    "PluginConfig",
    "Registry",
    "Rule",
    "RuleConfig",
    "RuleTest",
    "RuleTestStep",
    "SourceSpec",
    "Table",
    "TlsConfig",
    "UplinkConfig",
    "build_config",
    "bundled_plugin_dir",
    "parse_duration",
    "parse_size",
    "plugin_search_paths",
    "resolve_plugin_path",
]
