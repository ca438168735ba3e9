"""Stage 3: Measurement -> Commands. No I/O of its own: clock (and state store) injected.

``cel.py`` compiles and evaluates CEL conditions (the only cel-expr-python import); ``engine.py``
holds the rule engine and the config checks built on it; ``state.py`` the durable rule state
(SQLite); ``replay.py`` runs rules in simulated time (rule test cases, dry-run replays).
"""

from flux_edge.rules.cel import Condition, compile_condition
from flux_edge.rules.engine import (
    MAP_VARIABLES,
    ConditionError,
    RuleEngine,
    RuleStats,
    check_rules,
    compile_interlock,
    rule_variables,
)
from flux_edge.rules.state import RuleStore, StateRecord

__all__ = [
    "MAP_VARIABLES",
    "Condition",
    "ConditionError",
    "RuleEngine",
    "RuleStats",
    "RuleStore",
    "StateRecord",
    "check_rules",
    "compile_condition",
    "compile_interlock",
    "rule_variables",
]
