"""vLLM + vllm-ascend on Ascend NPUs (``omnisim backend=ascend``): launch plans (Mooncake / LLMDataDist KV
connectors, HCCL environment, device lists, vllm-ascend eplb_config), per-node launch scripts, and a preflight that
fails early when torch_npu, vllm_ascend or the NPUs are missing. The plans are pure and tested anywhere; running
needs an Ascend machine.

    from backends.ascend.launch_plan import AscendSettings, plan_instances, node_scripts
    from backends.ascend.backend import AscendBackend          # the Hydra backend (conf/backend/ascend.yaml)
"""
