"""Per-request records (one schema for simulated and real runs), the summariser, plots and run output."""
from omnisim.metrics.comparison import compare_runs, compare_summaries
from omnisim.metrics.confidence import Interval, confidence_interval
from omnisim.metrics.instances import INSTANCE_COLUMNS, utilisation, validate_instances
from omnisim.metrics.latency import request_latencies
from omnisim.metrics.plots import write_plots
from omnisim.metrics.records import (
    OPTIONAL_RECORD_COLUMNS, RECORD_COLUMNS, STATUSES, read_records, records_frame, validate_records,
)
from omnisim.metrics.run_output import SUMMARY_FILE, json_ready, write_run
from omnisim.metrics.slo import SLO
from omnisim.metrics.summary import format_summary, summarize

__all__ = [
    "INSTANCE_COLUMNS", "Interval", "OPTIONAL_RECORD_COLUMNS", "RECORD_COLUMNS", "SLO", "STATUSES", "SUMMARY_FILE",
    "compare_runs", "compare_summaries", "confidence_interval", "format_summary", "json_ready", "read_records",
    "records_frame", "request_latencies", "summarize", "utilisation", "validate_instances", "validate_records",
    "write_plots", "write_run",
]
