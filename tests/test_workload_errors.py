"""Malformed trace files fail with ValueError naming FILE:LINE and the column; missing files name the path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnisim.workload import AzureTrace, EmpiricalLengths, MooncakeTrace, ShareGPTWorkload

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = ["2023-11-16 18:15:46.6805900,374,44\n", "2023-11-16 18:15:50.9951690,396,109\n"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad_row, line, message", [
    ("2023-11-16 18:15:51.2224670,abc,10\n", 4, "column 'ContextTokens'"),
    ("2023-11-16 18:15:51.2224670,12,-3\n", 4, "column 'GeneratedTokens'"),
    ("2023-11-16 18:15:51.2224670,12.5,3\n", 4, "column 'ContextTokens'"),
    ("2023-11-16 18:15:51.2224670,12\n", 4, "missing column 'GeneratedTokens'"),
    ("2023-11-16 18:15:51.2224670,12,3,9\n", 4, "expected 3 fields, got 4"),
    ("yesterday,12,3\n", 4, "column 'TIMESTAMP'"),
    ("2023-11-16 18:15:40.0000000,12,3\n", 4, "sorted by time"),
    ("2023-11-16 18:15:51.2224670,1e23,3\n", 4, "more than any model serves"),  # not a 1-token prompt
])
def test_azure_bad_row_names_file_line_and_column(tmp_path, bad_row, line, message):
    path = write(tmp_path, "azure.csv", HEADER + "".join(GOOD) + bad_row + "2023-11-16 18:15:59.0000000,5,5\n")
    with pytest.raises(ValueError, match=rf"azure\.csv:{line}:") as error:
        AzureTrace(seed=0, path=str(path))
    assert message in str(error.value)


def test_azure_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "azure.csv", HEADER + GOOD[0] + "\n\n" + GOOD[1] + "2023-11-16 18:15:52.0,x,1\n")
    with pytest.raises(ValueError, match=r"azure\.csv:6: column 'ContextTokens'"):
        AzureTrace(seed=0, path=str(path))


def test_azure_missing_header_column(tmp_path):
    path = write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n")
    with pytest.raises(ValueError, match=r"azure\.csv:1: missing column 'GeneratedTokens'"):
        AzureTrace(seed=0, path=str(path))


@pytest.mark.parametrize("text, message", [("", "empty file"), (HEADER, "no data rows")])
def test_azure_empty_file(tmp_path, text, message):
    path = write(tmp_path, "azure.csv", text)
    with pytest.raises(ValueError, match=message):
        AzureTrace(seed=0, path=str(path))


def test_azure_zero_counts_are_replayed_as_one(tmp_path):
    path = write(tmp_path, "azure.csv", HEADER + "2023-11-16 18:15:46.6805900,0,0\n" + GOOD[1])
    first, second = AzureTrace(seed=0, path=str(path)).requests()
    assert (first.prompt_tokens, first.output_tokens) == (1, 1)
    assert (second.prompt_tokens, second.output_tokens, second.id) == (396, 109, "r1")


def test_missing_file_names_the_path_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"workload\.path.*no_such\.csv"):
        AzureTrace(seed=0, path=str(tmp_path / "no_such.csv"))
    with pytest.raises(FileNotFoundError, match=r"workload\.path.*nowhere/trace\.jsonl"):
        MooncakeTrace(seed=0, path="nowhere/trace.jsonl")
    with pytest.raises(FileNotFoundError, match=r"workload\.path"):
        ShareGPTWorkload(seed=0, rate=1.0, path="nowhere.csv", max_requests=1)


def mooncake_line(timestamp=0, input_length=600, output_length=5, hash_ids=(1, 2)) -> str:
    return json.dumps(dict(timestamp=timestamp, input_length=input_length, output_length=output_length,
                           hash_ids=list(hash_ids))) + "\n"


@pytest.mark.parametrize("bad_line, message", [
    ('{"timestamp": 5, "input_length": 600\n', "not valid JSON"),
    ("[1, 2]\n", "expected a JSON object"),
    ('{"input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n', "field 'timestamp': missing"),
    (mooncake_line(6000, input_length="600"), "field 'input_length'"),
    (mooncake_line(6000, output_length=-1), "field 'output_length'"),
    (mooncake_line(6000, hash_ids=(1, "x")), "field 'hash_ids'"),
    (mooncake_line(6000, input_length=1100), "needs 3 blocks of hash_block_tokens=512"),
    (mooncake_line(timestamp=-1), "field 'timestamp'"),
    (mooncake_line(6000, input_length=10**23, hash_ids=()), "more than any model serves"),
    (mooncake_line(6000, hash_ids=(1, 10**23)), "does not fit in 64 bits"),
])
def test_mooncake_bad_line_names_file_line_and_field(tmp_path, bad_line, message):
    path = write(tmp_path, "mc.jsonl", mooncake_line() + mooncake_line(3000) + bad_line)
    with pytest.raises(ValueError, match=r"mc\.jsonl:3: ") as error:
        MooncakeTrace(seed=0, path=str(path))
    assert message in str(error.value)


def test_mooncake_unsorted_and_empty(tmp_path):
    path = write(tmp_path, "mc.jsonl", mooncake_line(3000) + "\n" + mooncake_line(0))
    with pytest.raises(ValueError, match=r"mc\.jsonl:3: field 'timestamp': rows must be sorted"):
        MooncakeTrace(seed=0, path=str(path))
    with pytest.raises(ValueError, match="empty file"):
        MooncakeTrace(seed=0, path=str(write(tmp_path, "empty.jsonl", "\n")))


def test_mooncake_other_block_size(tmp_path):
    path = write(tmp_path, "mc.jsonl", mooncake_line(input_length=200, hash_ids=(7, 8)) + mooncake_line(3000, 256))
    (first, second) = MooncakeTrace(seed=0, path=str(path), hash_block_tokens=128, spread_buckets=False).requests()
    assert first.hash_block_tokens == 128 and first.prefix_hashes == (7, 8)
    assert second.arrival_s == 3.0
    with pytest.raises(ValueError, match="hash_block_tokens"):
        MooncakeTrace(seed=0, path=str(path), hash_block_tokens=0)


def test_empirical_lengths_bad_row_and_column(tmp_path):
    path = write(tmp_path, "lengths.csv", "p,o\n10,5\n20,x\n")
    with pytest.raises(ValueError, match=r"lengths\.csv:3: column 'o'"):
        EmpiricalLengths(str(path), "p", "o")
    with pytest.raises(ValueError, match=r"lengths\.csv:1: missing column 'q'"):
        EmpiricalLengths(str(path), "p", "q")


@pytest.mark.parametrize("make", [
    lambda path: path.write_bytes((HEADER + GOOD[0]).encode("utf-16")),
    lambda path: path.write_bytes((HEADER + GOOD[0]).encode() + b"2023-11-16 18:15:50.9951690,\xff\xfe,3\n"),
])
def test_a_trace_that_is_not_utf8_names_its_line(tmp_path, make):
    path = tmp_path / "t.csv"
    make(path)
    with pytest.raises(ValueError, match=r"t\.csv:\d+: not UTF-8 text"):
        AzureTrace(seed=0, path=str(path))
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_bytes(mooncake_line().encode() + b"\x89PNG\r\n\x1a\n\x00\xff\n")
    with pytest.raises(ValueError, match=r"mc\.jsonl:2: not UTF-8 text"):
        MooncakeTrace(seed=0, path=str(jsonl))
