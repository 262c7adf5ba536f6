"""Request sources: synthetic arrivals with sampled lengths, and replays of public traces (Azure LLM 2023,
Mooncake, ShareGPT lengths), and closed loops of clients over any of them. Every one has
``requests() -> Iterator[Request]``."""
from omnisim.workload.azure import AZURE_CONV_PATH, AzureTrace, load_azure_trace
from omnisim.workload.closed_loop import ClientPool, ClosedLoopWorkload
from omnisim.workload.lengths import (
    EmpiricalLengths, Fixed, IndependentLengths, LengthDistribution, LengthSpec, Lognormal, Uniform, sharegpt_lengths,
)
from omnisim.workload.limits import Limits
from omnisim.workload.mooncake import MOONCAKE_CONV_PATH, MooncakeTrace, load_mooncake_trace, spread_ties
from omnisim.workload.prefix import PrefixSpec, chain_hash
from omnisim.workload.rate_steps import RateSteps
from omnisim.workload.request_list import RequestList
from omnisim.workload.summary import summarize_workload
from omnisim.workload.synthetic import (
    SHAREGPT_PATH, GammaWorkload, PoissonWorkload, ShareGPTWorkload, SyntheticWorkload,
)
from omnisim.workload.trace_file import REPO_ROOT, resolve_trace_path
from omnisim.workload.trace_replay import TraceReplay
from omnisim.workload.workload import Workload

__all__ = [
    "AZURE_CONV_PATH", "MOONCAKE_CONV_PATH", "REPO_ROOT", "SHAREGPT_PATH", "AzureTrace", "ClientPool",
    "ClosedLoopWorkload", "EmpiricalLengths", "Fixed",
    "GammaWorkload", "IndependentLengths", "LengthDistribution", "LengthSpec", "Limits", "Lognormal", "MooncakeTrace",
    "PoissonWorkload", "PrefixSpec", "RateSteps", "RequestList", "ShareGPTWorkload", "SyntheticWorkload",
    "TraceReplay", "Uniform", "Workload", "chain_hash", "load_azure_trace", "load_mooncake_trace",
    "resolve_trace_path", "sharegpt_lengths", "spread_ties", "summarize_workload",
]
