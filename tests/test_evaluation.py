"""The eval file format, task scoring, perplexity and held-out agreement text (adalora_deploy.evaluation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adalora_deploy.demo import byte_tokenizer, tiny_llama
from adalora_deploy.errors import DataError
from adalora_deploy.evaluation import (
    AGREEMENT_POSITIONS,
    AGREEMENT_SEQ_LEN,
    EvalSet,
    TaskExample,
    IGNORE,
    agreement_ids,
    evaluate,
    evaluate_examples,
    left_pad,
    read_eval_file,
    torch_logits,
)


def _write(path, lines):
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n")
    return path


def test_read_eval_file_mixes_task_and_text_lines(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [
        {"prompt": "Is it good? ", "choices": ["yes", "no"], "label": 0},
        "",
        {"text": "Some text to score."},
    ])
    eval_set = read_eval_file(path)
    assert eval_set.tasks == (TaskExample("Is it good? ", ("yes", "no"), 0),)
    assert eval_set.texts == ("Some text to score.",)
    assert eval_set.perplexity_texts == ("Some text to score.",)
    assert EvalSet(tasks=eval_set.tasks, texts=()).perplexity_texts == ("Is it good? yes",)


@pytest.mark.parametrize("line, message", [
    ("{not json", "eval.jsonl:1: not valid JSON"),
    ({"prompt": "p", "choices": ["a"], "label": 0}, "two or more"),
    ({"prompt": "p", "choices": ["a", "b"], "label": 2}, "index of the correct choice"),
    ({"prompt": "p", "choices": ["a", "b"], "label": True}, "index of the correct choice"),
    ({"question": "p"}, "expected a task line"),
])
def test_malformed_eval_lines_name_the_line(tmp_path, line, message):
    path = _write(tmp_path / "eval.jsonl", [line])
    with pytest.raises(DataError, match=message):
        read_eval_file(path)


def test_left_pad_aligns_rows_to_the_right():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_task_answer_is_the_choice_with_the_larger_first_token_logit():
    tokenizer = byte_tokenizer()
    yes, no = tokenizer("y")["input_ids"][0], tokenizer("n")["input_ids"][0]
    tasks = tuple(TaskExample(f"question {i}? ", ("yes", "no"), i % 2) for i in range(6))

    def always_yes(ids, mask):
        logits = np.zeros((*ids.shape, len(tokenizer)), np.float32)
        logits[..., yes] = 2.0
        logits[..., no] = 1.0
        return logits

    result = evaluate(always_yes, tokenizer, EvalSet(tasks=tasks, texts=()), batch_size=4)
    assert result.answers == (0,) * 6 and result.accuracy == 0.5
    # perplexity of a distribution that never depends on the text: exp(-log p(token)), p from the softmax
    assert result.num_tokens > 0 and math.isfinite(result.perplexity)
    with pytest.raises(DataError, match="share a first token"):
        evaluate(always_yes, tokenizer, EvalSet(tasks=(TaskExample("q", ("yes", "yeah"), 0),), texts=()))


def test_perplexity_of_a_torch_model_matches_its_loss():
    model = tiny_llama(seed=0).eval()
    tokenizer = byte_tokenizer()
    text = "The harbour lights came on one by one."
    result = evaluate(torch_logits(model), tokenizer, EvalSet(tasks=(), texts=(text,)))
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert result.accuracy is None and result.num_tokens == ids.shape[1] - 1
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_left_padding_does_not_change_the_answers():
    model = tiny_llama(seed=0).eval()
    tokenizer = byte_tokenizer()
    tasks = (TaskExample("a long question about rivers and boats? ", ("yes", "no"), 0),
             TaskExample("short? ", ("yes", "no"), 1))
    batched = evaluate(torch_logits(model), tokenizer, EvalSet(tasks=tasks, texts=()), batch_size=2)
    one_by_one = evaluate(torch_logits(model), tokenizer, EvalSet(tasks=tasks, texts=()), batch_size=1)
    assert batched.answers == one_by_one.answers
    assert batched.perplexity == pytest.approx(one_by_one.perplexity, rel=1e-5)


def test_agreement_ids_default_text_gives_several_hundred_positions(tmp_path):
    tokenizer = byte_tokenizer()
    ids = agreement_ids(tokenizer)
    assert ids.shape == (AGREEMENT_POSITIONS // AGREEMENT_SEQ_LEN, AGREEMENT_SEQ_LEN) and ids.dtype == np.int64
    short = _write(tmp_path / "eval.jsonl", [{"prompt": "Is it good? ", "choices": ["yes", "no"], "label": 0}])
    from_eval = agreement_ids(tokenizer, short)  # an eval file's task lines written out
    assert from_eval.size == len(tokenizer("Is it good? yes")["input_ids"]) + 1  # + EOS
    with pytest.raises(DataError):
        agreement_ids(tokenizer, tmp_path / "missing.txt")


def test_held_out_scores_read_only_the_positions_their_labels_need():
    """evaluate_examples asks torch for the last positions only (``logits_to_keep``): the same loss and answers as
    the full logits, with the lm_head run on fewer rows; labels of different lengths, one from position 1."""
    from adalora_deploy.data.examples import Example

    model = tiny_llama(seed=0).eval()
    generator = torch.Generator().manual_seed(0)

    def example(prompt: int, completion: int) -> Example:
        ids = torch.randint(3, 250, (prompt + completion,), generator=generator).tolist()
        return Example(tuple(ids), tuple([IGNORE] * prompt + ids[prompt:]))

    examples = [example(9, 2), example(4, 3), example(12, 1), example(1, 5), example(7, 2)]
    choices = (examples[0].labels[9], examples[1].labels[4], 200)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        tail = evaluate_examples(torch_logits(model), examples, choices=choices, batch_size=3)
        full_logits = torch_logits(model)
        full = evaluate_examples(lambda ids, mask, last: full_logits(ids, mask)[:, -last:], examples, choices=choices,
                                 batch_size=3)
    finally:
        hook.remove()
    assert tail.loss == pytest.approx(full.loss, rel=1e-6) and tail.accuracy == full.accuracy
    # per-example answers and true choices (-1: a completion that starts with none of the choices)
    assert tail.answers == full.answers and len(tail.answers) == len(examples)
    firsts = [next(t for t in e.labels if t != IGNORE) for e in examples]
    assert tail.labels == tuple(choices.index(t) if t in choices else -1 for t in firsts)
    assert tail.labels[:2] == (0, 1)
    assert tail.accuracy == sum(a == y for a, y in zip(tail.answers, tail.labels)) / len(examples)
    assert tail.tokens == full.tokens == sum(e.trained_tokens for e in examples)
    tail_rows, full_rows = sum(rows[:2]), sum(rows[2:])  # two batches each: rows x padded length
    assert full_rows == 3 * 13 + 2 * 9 and tail_rows == 3 * 4 + 2 * 6
