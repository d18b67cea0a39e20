"""Text files into token blocks; batches as a pure function of (seed, index)."""

from __future__ import annotations

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
    ("x.csv", "a,b", "must end in .txt or .jsonl"),
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
