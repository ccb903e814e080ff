"""Hard-parameter-sharing multi-task model: one shared encoder, one decoder per task (keyed by task name)."""
import torch.nn as nn

from mtrobust_fast.tasks import classification
from mtrobust_fast import tasks as task_registry
from mtrobust_fast.tasks.protocol import TaskRecord

# Every encoder ends at stride 32 and every decoder up-samples ×32, so inputs must be multiples of this.
STRIDE = 32


def check_image_batch(x, stride=STRIDE, channels=3):
    """Raise a clear ValueError unless ``x`` is a floating [B, channels, H, W] batch with H, W divisible by
    ``stride``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be an image batch of shape [B, {channels}, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of pixels in [0, 1], got dtype {x.dtype}")
    height, width = x.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"x height and width must be divisible by {stride}, got {height}×{width}")


class MultiTaskModel(nn.Module):
    """Images in [0, 1] → ``{task name: raw output at the input resolution}``.

    The model maps pixels to [-1, 1] itself (as the source's data pipeline did), so attacks and users work in
    [0, 1] pixel space. ``encode`` gives the shared representation, ``decode`` applies every task head to it,
    and ``forward`` is their composition; the representation is not part of ``forward``'s output so that the
    output dict holds only task predictions. ``config`` is the plain-data recipe that rebuilds the model
    (see ``registry.build_model`` and ``checkpoint``).
    """

    def __init__(self, encoder, decoders, config=None, records=None):
        super().__init__()
        if not decoders:
            raise ValueError("decoders must hold at least one task head")
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.config = dict(config or {})
        records = dict(records or {})
        stray = [name for name in records if name not in self.decoders]
        bad = [name for name, r in records.items() if not isinstance(r, TaskRecord)]
        if stray or bad:
            raise ValueError(f"records must map head names {list(self.decoders)} to task records; "
                             + (f"no head is named {stray}" if stray else f"{bad} are not task records"))
        self.records = records

    @property
    def task_names(self):
        return list(self.decoders.keys())

    @property
    def task_records(self):
        """``{head name: task record}`` of the heads that have one: the ``records`` given, the heads
        ``config["heads"]`` describes, and heads named after Taskonomy tasks. A head with none of these has no
        record; attacks then need a :class:`~mtrobust_fast.attacks.TaskSpec` for it."""
        heads = self.config.get("heads", {})
        out = {}
        for name in self.decoders:
            if name in self.records:
                out[name] = self.records[name]
            elif name in heads:
                out[name] = classification.task_from_config(name, heads[name])
            elif name in task_registry.BY_NAME or name in task_registry.BY_LETTER:
                out[name] = task_registry.get_task(name)
        return out

    @property
    def evaluated_task_names(self):
        """The tasks whose labels come with the data (every task but the self-supervised auxiliary ones)."""
        auxiliary = set(self.config.get("auxiliary", []))
        return [name for name in self.decoders if name not in auxiliary]

    def shared_parameters(self):
        """The parameters every task's gradient reaches (the encoder); each head owns the rest."""
        return list(self.encoder.parameters())

    def normalize(self, x):
        """[0, 1] pixels → the encoder's input range: [-1, 1] for Taskonomy models (what they were trained on),
        or (x − mean) / std per channel when ``config["normalization"]`` gives them (classifiers)."""
        normalization = self.config.get("normalization")
        if normalization is None:
            return x * 2.0 - 1.0
        mean = x.new_tensor(normalization["mean"]).view(1, -1, 1, 1)
        std = x.new_tensor(normalization["std"]).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode(self, x):
        """The shared representation of ``x``. One-channel models (``config["input_channels"] == 1``, e.g. chest
        X-rays) repeat the normalised channel three times, which makes the encoder's first convolution a
        one-channel convolution whose kernel is the sum of its three."""
        channels = self.config.get("input_channels", 3)
        check_image_batch(x, self.config.get("input_stride", STRIDE), channels)
        x = self.normalize(x)
        return self.encoder(x.expand(-1, 3, -1, -1) if channels == 1 else x)

    def decode(self, representation):
        return {name: decoder(representation) for name, decoder in self.decoders.items()}

    def forward(self, x, with_features=False):
        """``{task: output}``, or ``(outputs, shared representation)`` with ``with_features`` (what gradient-based
        task weightings need; passing it through ``forward`` keeps DDP's bookkeeping intact)."""
        representation = self.encode(x)
        outputs = self.decode(representation)
        return (outputs, representation) if with_features else outputs
