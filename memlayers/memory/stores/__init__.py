"""Value stores: the tables a memory reads. The seam that is shared, sharded or moved."""

from .concat_table import ConcatTable
from .ive import ImplicitValueExpansion
from .peer_experts import PEERExperts
from .projected_input import ProjectedInput
from .ring_window import RingWindow
from .value_table import ValueTable

__all__ = ["ConcatTable", "ImplicitValueExpansion", "PEERExperts", "ProjectedInput", "RingWindow", "ValueTable"]
