"""``adalora-deploy run``: the whole job in one command, stage by stage, resumable.

::

    prepare           base folder: a package's GGUF converted once, a float model quantized to GPTQ once
                      (both cached); held-out records written to data/heldout.jsonl
    evaluate-base     held-out loss and task accuracy of the base
    train             AdaLoRA (resumes from its checkpoint when the job was interrupted)
    evaluate-trained  the trained model in torch: what the deployed graphs are judged against
    compact           the adapter sliced to its surviving ranks (AdaLoRA and LoRA formats)
    export            every graph of the config's ``export`` list
    check             each graph against the trained model (adalora-deploy check)
    evaluate-exports  each graph under onnxruntime on the same held-out data
    report            report.md, report.json and PNG plots

Every finished stage is recorded in ``job.json`` with its results and seconds, so a rerun resumes after
the last finished stage; ``--from STAGE`` redoes from a stage.
"""

from adalora_deploy.job.runner import JobResult, run_job
from adalora_deploy.job.stages import STAGES

__all__ = ["STAGES", "JobResult", "run_job"]
