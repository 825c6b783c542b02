"""Fault injection (`inject`) and detection (`detect`).

`jaxdml.faults.parse("nan@60,device_loss@100:3")` turns a fault plan string into
`Fault`s; see `jaxdml.faults.inject` for the grammar.
"""

from jaxdml.faults.inject import KINDS, Fault, FaultPlanError, parse

__all__ = ["KINDS", "Fault", "FaultPlanError", "parse"]
