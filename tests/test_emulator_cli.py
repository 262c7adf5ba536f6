"""``python -m backends.emulator``: a bad setting is one line naming the flag and exit status 2, never a
traceback and never an engine that serves nonsense (NaN or negative step times)."""
import subprocess
import sys

import pytest

from backends.emulator.__main__ import main, parse_args


@pytest.mark.parametrize("args, flag", [
    (["--mixed", "1", "--time-scale", "-1"], "--time-scale"),
    (["--mixed", "1", "--time-scale", "nan"], "--time-scale"),
    (["--mixed", "1", "--decode-seq-s", "inf"], "--decode-seq-s"),
    (["--mixed", "1", "--overhead-s", "fast"], "--overhead-s"),
    (["--prefill", "-1", "--mixed", "1"], "--prefill"),
    (["--mixed", "1", "--block-size", "0"], "--block-size"),
    (["--mixed", "1", "--max-num-seqs", "x"], "--max-num-seqs"),
    (["--mixed", "1", "--ranks", "0"], "--ranks"),
])
def test_bad_flags_name_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(args)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and err.startswith("python -m backends.emulator: error:")


def test_a_setting_the_engine_refuses_is_one_line(capsys):
    # 8 tokens of KV cannot hold one 16-token block: the engine's own check, reported without a traceback
    assert main(["--mixed", "1", "--kv-capacity-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "error: kv capacity" in err and "Traceback" not in err


def test_ranks_reach_the_engines(capsys):
    # 32 tokens of KV hold two 16-token blocks: enough for one engine core, not for each of four DP ranks
    assert main(["--mixed", "1", "--kv-capacity-tokens", "32", "--ranks", "4", "--time-scale", "0"]) == 2
    err = capsys.readouterr().err
    assert "per DP rank" in err and "for 4 ranks" in err and "Traceback" not in err


def test_as_a_process():
    done = subprocess.run([sys.executable, "-m", "backends.emulator", "--mixed", "1", "--time-scale", "-2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--time-scale" in done.stderr
