"""The registry of training-recipe parts that are not objectives: the learning-rate schedule, weight averaging,
adversarial weight perturbation, label smoothing, GradAlign. Each part registers where it is defined and declares its
settings there; the training config gains them as fields and ``train`` as flags, with no list kept elsewhere."""
from mtrobust_fast.registry import Registry

RECIPES = Registry("training recipe part")
