"""The numeric precisions clipkit takes, named once for every entry point: ``create_model``, ``clipkit-train
--precision``, ``clipkit embed``/``eval`` and :func:`clipkit.embed_images`. No torch here: the command lines
offer them as choices before anything heavy is imported. What each one does is
:func:`clipkit.train.build.precision_setup` (autocast, loss scaling, input dtype) and the factory's weight cast.
"""

#: OpenCLIP's names, in the order of its training script's ``--precision`` choices.
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
