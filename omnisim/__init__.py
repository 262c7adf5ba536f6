"""omnisim: simulation-first platform for large-scale LLM serving (PD disaggregation, MoE placement, proxies)."""
__version__ = "0.1.0"
