"""Stage 3: Measurement -> Commands. Pure: no I/O, clock injected.

``cel.py`` compiles and evaluates CEL conditions (the only cel-expr-python import); ``engine.py``
holds the rule engine and the config checks built on it.
"""

from flux_edge.rules.cel import Condition, compile_condition
from flux_edge.rules.engine import RuleEngine, RuleStats, check_rules, rule_variables

__all__ = [
    "Condition",
    "RuleEngine",
    "RuleStats",
    "check_rules",
    "compile_condition",
    "rule_variables",
]
