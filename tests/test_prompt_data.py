"""The generic `prompt` dataset format and the keyword example's pieces (pure, no Ray)."""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewards.channels import score_channels
from rewards.registry import build_channels
from rlsys.config import load_config
from rlsys.data.episodebench import DataError
from rlsys.data.prompts import example_fields, load_prompts

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_and_chat_prompts_extra_columns_and_uids(tmp_path):
    rows = [{"prompt": "Say hi.", "keyword": "hi", "n": 3},
            {"uid": "b", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go."}],
             "keyword": "go", "n": 1}]
    for path in (_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.parquet"):
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist([{"uid": r.get("uid", "row0"), "prompt": json.dumps(r["prompt"])
                                                  if isinstance(r["prompt"], list) else r["prompt"],
                                                  "keyword": r["keyword"], "n": r["n"]} for r in rows]), path)
        ex = load_prompts(path)
        assert ex[0].messages == [{"role": "user", "content": "Say hi."}]
        assert ex[1].uid == "b" and [m["role"] for m in ex[1].messages] == ["system", "user"]
        fields = example_fields(ex[1])
        assert fields["keyword"] == "go" and fields["n"] == 1 and type(fields["n"]) is int and "extra" not in fields
    assert load_prompts(tmp_path / "d.jsonl")[0].uid == "d.jsonl:0"


@pytest.mark.parametrize("row, fragment", [
    ({"keyword": "x"}, "field 'prompt' is missing"),
    ({"prompt": [{"role": "user"}]}, "field 'prompt' message 0"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "ends with a 'assistant'"),
    ({"prompt": "x", "uid": ""}, "field 'uid'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, fragment):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert "bad.jsonl row 1 (line 2)" in str(e.value) and fragment in str(e.value), str(e.value)
    with pytest.raises(DataError, match="already used"):
        load_prompts(_jsonl(tmp_path / "dup.jsonl", [{"uid": 1, "prompt": "a"}, {"uid": 1, "prompt": "b"}]))


def test_keyword_example_rewards_get_the_row_columns(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    ex = load_prompts(ROOT / "examples" / "keyword" / "prompts.jsonl")
    assert len(ex) == 16 and {"keyword", "max_words"} <= set(ex[0].extra)
    cfg = load_config(ROOT / "examples" / "keyword" / "config.yaml").reward  # paths relative to the repo root
    channels = build_channels(cfg, cfg.active_channels(), res=None)
    word = ex[0].extra["keyword"]
    texts = [f"The {word.upper()} glowed.", "Nothing here.", " ".join(["w"] * 60)]
    [out] = asyncio.run(score_channels(channels, [{"texts": texts, "example": example_fields(ex[0])}], Counter()))
    assert out["keyword"] == [1.0, 0.0, 0.0] and out["brevity"] == [1.0, 1.0, 0.5] and all(out["valid"])
