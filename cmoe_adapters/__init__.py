"""cmoe_adapters: continual learning of vision-language models with mixtures of LoRA experts.

Importing the package registers the method with peft, so `get_peft_model(model,
ContinualMoEConfig(...))` and `PeftModel.from_pretrained(...)` work as for any peft method.
"""

from ._peft import CONTINUAL_MOE, register_with_peft
from .config import ContinualMoEConfig
from .experts import ContinualMoELayer
from .model import ContinualMoEModel
from .results import ContinualResult
from .trainer import ContinualMoETrainer, ContinualTrainingArguments, Task

__version__ = "0.1.0.dev0"

register_with_peft(ContinualMoEConfig, ContinualMoEModel)

__all__ = [
    "CONTINUAL_MOE",
    "ContinualMoEConfig",
    "ContinualMoELayer",
    "ContinualMoEModel",
    "ContinualMoETrainer",
    "ContinualResult",
    "ContinualTrainingArguments",
    "Task",
    "__version__",
]
