"""cmoe_adapters: continual learning of vision-language models with mixtures of LoRA experts.

Importing the package registers the method with peft, so `get_peft_model(model,
ContinualMoEConfig(...))` and `PeftModel.from_pretrained(...)` work as for any peft method.
"""

# First, before anything imports peft/transformers/torch: a clear error if their versions are off.
from .dependencies import check_dependencies

check_dependencies()

from ._peft import CONTINUAL_MOE, register_with_peft  # noqa: E402
from .aux_loss import RouterAuxLossMixin  # noqa: E402
from .config import ContinualMoEConfig  # noqa: E402
from .experts import ContinualMoELayer  # noqa: E402
from .fingerprint import BaseModelMismatchError, BaseModelMismatchWarning  # noqa: E402
from .integrity import AdapterFileError, AdapterSaveError  # noqa: E402
from .locator import TaskLocation  # noqa: E402
from .model import ContinualMoEModel  # noqa: E402
from .results import ContinualResult  # noqa: E402
from .trainer import ContinualMoETrainer, ContinualTrainingArguments, Task  # noqa: E402

__version__ = "0.1.0.dev0"

register_with_peft(ContinualMoEConfig, ContinualMoEModel)

__all__ = [
    "CONTINUAL_MOE",
    "AdapterFileError",
    "AdapterSaveError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "ContinualMoEConfig",
    "ContinualMoELayer",
    "ContinualMoEModel",
    "ContinualMoETrainer",
    "ContinualResult",
    "ContinualTrainingArguments",
    "RouterAuxLossMixin",
    "Task",
    "TaskLocation",
    "__version__",
]
