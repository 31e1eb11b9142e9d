"""Lightning stages and the Hydra-facing run function (imports Lightning; vitq.quant does not).

Importing the engine registers every stage (`context.STAGES`): the stage modules import the context,
never each other.
"""
from . import deploy, finetune, reconstruct, stages  # noqa: F401  (registration side effects)
