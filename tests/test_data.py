"""Data as users have it: files and formats into examples with loss masks; batches as a pure function of (seed, index)."""

from __future__ import annotations

import json

import pytest
import torch

from adalora_deploy.data import BlockBatches, DataError, read_texts, token_blocks
from adalora_deploy.demo import byte_tokenizer


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(tmp_path / "a.txt") == ["hello world"]
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    blocks = token_blocks(tmp_path / "b.jsonl", byte_tokenizer(), 4)
    tokenizer = byte_tokenizer()
    expected = tokenizer("one")["input_ids"] + [257] + tokenizer("two")["input_ids"] + [257]
    assert blocks.view(-1).tolist() == expected  # documents joined by EOS (id 257), cut into blocks of 4


@pytest.mark.parametrize(("name", "content", "message"), [
    ("x.xml", "<a/>", "must end in .txt, .jsonl, .csv, .parquet"),
    ("x.jsonl", "{bad json", "not valid JSON"),
    ("x.jsonl", '{"content": "a"}', 'string "text" field'),
    ("x.txt", "ab", "fewer than one block"),
])
def test_bad_data_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        token_blocks(tmp_path / name, byte_tokenizer(), 8)
    with pytest.raises(DataError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_batches_depend_only_on_seed_and_index():
    blocks = torch.arange(50).view(10, 5)
    first, second = BlockBatches(blocks, 3, seed=7), BlockBatches(blocks, 3, seed=7)
    late = [second.batch(i) for i in (9, 2, 5)]
    assert all(torch.equal(first.batch(i), b) for i, b in zip((9, 2, 5), late))
    epoch = torch.cat([first.batch(i) for i in range(10)])[:30]  # 3 epochs of 10 blocks, each a permutation
    for e in range(3):
        assert sorted(epoch[e * 10:(e + 1) * 10, 0].tolist()) == list(range(0, 50, 5))
    assert not torch.equal(BlockBatches(blocks, 3, seed=8).batch(0), first.batch(0))


# --- instruction data -----------------------------------------------------------------------------


from adalora_deploy.config import DataConfig  # noqa: E402
from adalora_deploy.data import (  # noqa: E402
    ExampleBatches,
    build_training_data,
    read_records,
    render_records,
)
from adalora_deploy.data.examples import IGNORE, tokenize_records  # noqa: E402


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_prompt_completion_trains_on_the_completion_only(tmp_path):
    tokenizer = byte_tokenizer()
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Review: fine.\nSentiment:", "completion": " positive"}) + "\n")
    data = build_training_data(DataConfig(train=str(path)), tokenizer, seq_len=64, seed=0)
    (example,) = data.train
    assert data.format == "prompt_completion"
    assert _labelled_text(tokenizer, example) == " positive</s>"  # completion + EOS carry the loss
    assert tokenizer.decode(example.input_ids) == "Review: fine.\nSentiment: positive</s>"


def test_messages_train_on_assistant_turns_only(tmp_path):
    tokenizer = byte_tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"},
                                             {"role": "user", "content": "again"},
                                             {"role": "assistant", "content": "yes"}]}) + "\n")
    data = build_training_data(DataConfig(train=str(path)), tokenizer, seq_len=256, seed=0)
    (example,) = data.train
    assert data.format == "messages"
    assert _labelled_text(tokenizer, example) == "hello</s>\nyes</s>\n"
    assert "be brief" in tokenizer.decode(example.input_ids)


def test_csv_with_filter_value_map_templates_and_chat(tmp_path):
    tokenizer = byte_tokenizer()
    path = tmp_path / "reviews.csv"
    path.write_text("text,label,source\ngreat film,1,rt\ndull,0,rt\nlong imdb review,1,imdb\n")
    config = DataConfig(train=str(path), where={"source": "rt"}, map={"label": {0: "negative", 1: "positive"}},
                        prompt="Review: {text}", completion="{label}", chat=True)
    data = build_training_data(config, tokenizer, seq_len=128, seed=0)
    assert len(data.train) == 2 and data.format == "prompt_completion"
    texts = sorted(tokenizer.decode(e.input_ids) for e in data.train)
    assert texts == ["<s>user\nReview: dull</s>\n<s>assistant\nnegative</s>\n",
                     "<s>user\nReview: great film</s>\n<s>assistant\npositive</s>\n"]
    assert sorted(_labelled_text(tokenizer, e) for e in data.train) == ["negative</s>\n", "positive</s>\n"]


def test_parquet_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), tmp_path / "d.parquet")
    assert read_records(tmp_path / "d.parquet") == [{"prompt": "a", "completion": "x"},
                                                      {"prompt": "b", "completion": "y"}]


def test_held_out_split_is_disjoint_deterministic_and_limited(tmp_path):
    tokenizer = byte_tokenizer()
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(50)))
    config = DataConfig(train=str(path), eval_size=10, limit=25)
    first = build_training_data(config, tokenizer, seq_len=32, seed=3)
    again = build_training_data(config, tokenizer, seq_len=32, seed=3)
    other = build_training_data(config, tokenizer, seq_len=32, seed=4)
    assert len(first.train) == 25 and len(first.eval) == 10 == len(first.eval_records)
    assert first == again and first.eval != other.eval
    held_out = {r["prompt"] for r in first.eval_records}
    trained = {tokenizer.decode(e.input_ids).split("a")[0] for e in first.train}
    assert not held_out & trained


def test_truncation_keeps_the_completion_and_drops_examples_whose_completion_cannot_fit(tmp_path):
    tokenizer = byte_tokenizer()
    rendered = [{"prompt": "x" * 40, "completion": "yes"}, {"prompt": "p", "completion": "z" * 40}]
    examples, dropped = tokenize_records(rendered, "prompt_completion", tokenizer, seq_len=16)
    assert dropped == 1 and len(examples) == 1  # a 41-token completion cannot fit in 16 tokens with its prompt
    assert len(examples[0].input_ids) == 16
    assert _labelled_text(tokenizer, examples[0]) == "yes</s>"  # the prompt lost its start, not the answer
    # chat examples end with the assistant turn, so truncation keeps it; a completion-free record has nothing
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 40},
                                             {"role": "assistant", "content": ""}]}) + "\n")
    data = build_training_data(DataConfig(train=str(path)), tokenizer, seq_len=16, seed=0)
    assert _labelled_text(tokenizer, data.train[0]) == "</s>\n"  # even an empty turn teaches where to stop
    path.write_text(json.dumps({"prompt": "y" * 4, "completion": "z" * 30}) + "\n")
    with pytest.raises(DataError, match="no example fits in train.seq_len = 16 tokens with its completion whole"):
        build_training_data(DataConfig(train=str(path)), tokenizer, seq_len=16, seed=0)


@pytest.mark.parametrize(("records", "options", "message"), [
    ([{"question": "q"}], {}, "expected text, prompt \\+ completion, or messages"),
    ([{"prompt": "q", "completion": 3}], {}, 'string "prompt" and "completion"'),
    ([{"messages": [{"role": "user", "content": "q"}]}], {}, "no assistant turn"),
    ([{"a": "1"}], {"where": {"a": "2"}}, "no record has"),
    ([{"a": "1"}], {"prompt": "{b}", "completion": "x"}, "uses the field 'b'"),
])
def test_records_the_format_cannot_use(records, options, message):
    with pytest.raises(DataError, match=message):
        render_records(records, **options)


def test_non_utf8_and_package_references(tmp_path, monkeypatch):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="is not installed"):
        read_records("package:no-such-dist-anywhere/x.csv")
    # a distribution on sys.path: its data file is found without importing anything
    site = tmp_path / "site"
    (site / "fakedata").mkdir(parents=True)
    (site / "fakedata" / "rows.csv").write_text("text\nhello\n")
    info = site / "fakedata-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedata\nVersion: 1.0\n")
    (info / "RECORD").write_text("fakedata/rows.csv,,\n")
    monkeypatch.syspath_prepend(str(site))
    assert read_records("package:fakedata/fakedata/rows.csv") == [{"text": "hello"}]
    with pytest.raises(DataError, match="no such file in fakedata"):
        read_records("package:fakedata/fakedata/missing.csv")
    with pytest.raises(DataError, match="leaves the package"):
        read_records("package:fakedata/../latin.txt")


def test_packed_text_batches_equal_the_block_batches():
    tokenizer = byte_tokenizer()
    data = build_training_data(DataConfig(train="builtin:sample"), tokenizer, seq_len=32, seed=0)
    packed = ExampleBatches(data.train, 4, seed=0, seq_len=32, pad_id=258, packing=True)
    blocks = BlockBatches(token_blocks("builtin:sample", tokenizer, 32), 4, seed=0)
    for index in (0, 5, 17):
        batch = packed.batch(index)
        assert torch.equal(batch["input_ids"], blocks.batch(index)) and torch.equal(batch["labels"], batch["input_ids"])
        assert bool(batch["attention_mask"].all())


def test_padded_batches_pad_right_with_ignored_labels(tmp_path):
    tokenizer = byte_tokenizer()
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "aaaa", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n')
    data = build_training_data(DataConfig(train=str(path)), tokenizer, seq_len=32, seed=0)
    batches = ExampleBatches(data.train, 2, seed=0, seq_len=32, pad_id=258, packing=False)
    batch = batches.batch(0)
    assert batch["input_ids"].shape == (2, 6)
    short = int(batch["attention_mask"].sum(1).argmin())
    assert batch["input_ids"][short, -2:].tolist() == [258, 258] and batch["labels"][short, -2:].tolist() == [-100, -100]
    assert torch.equal(batches.batch(3)["input_ids"], ExampleBatches(data.train, 2, 0, seq_len=32, pad_id=258,
                                                                     packing=False).batch(3)["input_ids"])
