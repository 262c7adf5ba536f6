"""Replays an omnisim workload against any OpenAI-compatible endpoint and records it in omnisim.metrics' schema.

    from backends.loadgen import LoadGenerator
    records = LoadGenerator("http://127.0.0.1:8000", stream=True, seed=0).replay(workload)  # or workload.requests()
    omnisim.metrics.write_run(out_dir, records, omnisim.metrics.summarize(records, slo))   # same summary.json

Inside a running event loop use ``await LoadGenerator(...).run(requests)`` (rows) and ``records_frame(rows)``.
"""
from backends.loadgen.load_generator import LoadGenerator
from backends.loadgen.prompt_synthesizer import PromptSynthesizer

__all__ = ["LoadGenerator", "PromptSynthesizer"]
