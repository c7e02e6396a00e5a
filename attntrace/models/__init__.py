"""Real models: a checkpoint on disk (or in an installed package) turned into plain numpy weights.

``checkpoint`` finds the files, ``safetensors_io`` reads tensors lazily, ``config`` reads
config.json into a :class:`~attntrace.models.config.ModelConfig`, ``families`` maps each
family's tensor names onto the neutral :class:`~attntrace.models.families.ModelWeights`,
and ``tokenize`` turns text (or ids) into the model's input.  Nothing here imports torch.
"""
