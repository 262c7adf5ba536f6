"""Tiny local models: built in seconds from a seed, the same bytes every time, servable shapes, a tokenizer with a
chat template; the cache never serves a half-written build."""
import json

import pytest

pytest.importorskip("transformers", reason="tiny models need transformers and torch (installed by .ci/install_vllm.sh)")
pytest.importorskip("torch", reason="tiny models need transformers and torch (installed by .ci/install_vllm.sh)")

from backends.vllm.tiny_models import DONE_MARKER, build_tiny_model, ensure_tiny_model, is_built, main  # noqa: E402


def files(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_llama_is_deterministic_and_servable(tmp_path):
    a = build_tiny_model(tmp_path / "a", "llama", seed=0)
    b = build_tiny_model(tmp_path / "b", "llama", seed=0)
    c = build_tiny_model(tmp_path / "c", "llama", seed=1)
    assert files(a) == files(b)
    assert files(a)["model.safetensors"] != files(c)["model.safetensors"]
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (128, 2, 512)
    assert sum(len(v) for v in files(a).values()) < 5e6

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("the quick brown fox serving request").input_ids
    assert 0 < len(ids) <= 8 and max(ids) < config["vocab_size"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|assistant|>") and "hello world" in chat


def test_qwen3_moe_has_8_experts_top_2(tmp_path):
    config = json.loads((build_tiny_model(tmp_path, "qwen3_moe") / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    experts = config.get("num_experts", config.get("num_local_experts"))  # transformers 5 saves num_local_experts
    assert (experts, config["num_experts_per_tok"]) == (8, 2)


def test_cache_builds_once_and_rebuilds_a_broken_build(tmp_path):
    path = ensure_tiny_model(tmp_path, "llama")
    assert is_built(path, "llama") and not is_built(path, "qwen3_moe")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path, "llama") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    (path / DONE_MARKER).unlink()  # as if a build was killed halfway
    assert ensure_tiny_model(tmp_path, "llama") == path and is_built(path, "llama")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging directories left behind


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        build_tiny_model(tmp_path, "gpt5")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--kind", "gpt5"])


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "m"), "--kind", "llama"])
    assert "written to" in capsys.readouterr().out and is_built(tmp_path / "m", "llama")
