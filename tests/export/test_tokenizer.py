"""The transformers-free tokenizer equals transformers' on the same folders: ids, text, chat templates, streaming."""

from __future__ import annotations

import pytest
from adalora_deploy.export.runtime.tokenizer import ChatTemplateError, TextTokenizer

from tests.export.conftest import CHAT_TEMPLATE

TEXTS = ["The river rises in the hills.", "  leading spaces and\nnew lines\t", "naïve café, 日本語, emoji 😀!", "a"]
MESSAGES = [
    [{"role": "user", "content": "Where does the river go?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And the mill? 😀"}],
]


def _byte_level(folder):
    from adalora_deploy.demo import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _trained_bpe(folder, kind: str):
    """A BPE trained in code on the sample text with a BOS post-processor: byte-level (GPT-2 style) or
    metaspace (SentencePiece/Llama style, whose decoder drops the first piece's leading space)."""
    from adalora_deploy.demo import SAMPLE_TEXT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None, byte_fallback=kind == "metaspace"))
    if kind == "metaspace":
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *alphabet],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if kind != "metaspace" else [])
    core.train([str(SAMPLE_TEXT)], trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", core.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["byte", "bytelevel-bpe", "metaspace-bpe"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return _byte_level(folder) if request.param == "byte" else _trained_bpe(folder, request.param.split("-")[0])


def test_encode_decode_and_chat_equal_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = TextTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    for messages in MESSAGES:
        rendered = ours.render_chat(messages)
        assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode_chat(messages) == list(theirs.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert ours.render_chat(MESSAGES[0], add_generation_prompt=False) == theirs.apply_chat_template(
        MESSAGES[0], tokenize=False, add_generation_prompt=False)


def test_streamed_text_equals_decoding_everything(folder):
    """Deltas are released only when whole (no half characters), and they add up to decode(all ids)."""
    tokenizer = TextTokenizer.from_folder(folder)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detokenizer = tokenizer.detokenizer()
        deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
        assert "".join(deltas) == tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas) or "\ufffd" in tokenizer.decode(ids)


def test_a_character_split_over_byte_tokens_waits_until_whole(tmp_path):
    tokenizer = TextTokenizer.from_folder(_byte_level(tmp_path))
    ids = tokenizer.encode("😀")
    assert len(ids) == 4  # one byte per token
    detokenizer = tokenizer.detokenizer()
    assert [detokenizer.push(i) for i in ids] == ["", "", "", "😀"]


def test_template_errors_and_missing_templates_are_user_errors(tmp_path):
    from adalora_deploy.demo import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    tokenizer.save_pretrained(tmp_path / "strict")
    with pytest.raises(ChatTemplateError, match="first must be user"):
        TextTokenizer.from_folder(tmp_path / "strict").render_chat([{"role": "system", "content": "x"}])
    plain = byte_tokenizer()
    plain.chat_template = None  # the demo tokenizer ships a template; a user's may not
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        TextTokenizer.from_folder(tmp_path / "plain").render_chat(MESSAGES[0])


def test_templates_run_sandboxed(tmp_path):
    from adalora_deploy.demo import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ChatTemplateError, match="unsafe"):  # jinja2's SecurityError, as one user error
        TextTokenizer.from_folder(tmp_path).render_chat(MESSAGES[0])
