"""Stage 4: ``Command`` -> side effect on a device -> ``Outcome``.

An executor never raises for a failed action: the failure is the ``Outcome`` (``ok=False`` with
the reason in ``error``), so the audit trail sees every attempt.
"""
