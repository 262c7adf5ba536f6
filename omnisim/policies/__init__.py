"""Every routing, placement and ordering policy, written once against omnisim.core."""
from omnisim.policies.by_phase import ByPhase
from omnisim.policies.kv_aware import KVAware
from omnisim.policies.least_load import LeastLoad
from omnisim.policies.least_requests import LeastRequests
from omnisim.policies.omni_proxy import OmniProxy
from omnisim.policies.pd_decider import PDDecider
from omnisim.policies.power_of_two import PowerOfTwo
from omnisim.policies.predictive import Predictive
from omnisim.policies.prefix_aware import PrefixAware
from omnisim.policies.random_choice import RandomChoice
from omnisim.policies.round_robin import RoundRobin
from omnisim.policies.tfas import TFAS

__all__ = ["ByPhase", "KVAware", "LeastLoad", "LeastRequests", "OmniProxy", "PDDecider", "PowerOfTwo", "Predictive",
           "PrefixAware", "RandomChoice", "RoundRobin", "TFAS"]
